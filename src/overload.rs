//! Overload protection: a process-wide cap on calls in flight that sheds the
//! excess at once, and a cap on open connections.
//!
//! Beyond `--max-concurrent-calls` a call is answered UNAVAILABLE (reason
//! `OVERLOADED`) before its request is read or decoded: it did not run, so a
//! client may retry it after a backoff. Waiting instead would let queued
//! requests pile up memory and every caller's latency with it; refusing keeps
//! the accepted calls' latency bounded. A call holds its slot until its
//! response body ends, so a Run or ModelStreamInfer stream counts for as long
//! as it is open. grpc.health and reflection are never shed: an overloaded
//! replica must still answer its probes.
//!
//! The same layer bounds the time until a call's answer starts by
//! `--request-timeout`, including the time its request takes to arrive: a
//! client that sends headers and then stalls its upload (a slow client) gets
//! DEADLINE_EXCEEDED and frees its slot, instead of holding it forever.
//!
//! Beyond `--max-connections` a new connection is closed as soon as it is
//! accepted (the client sees UNAVAILABLE), so descriptors and per-connection
//! HTTP/2 buffers stay bounded. A connection that has not sent the 24-byte
//! HTTP/2 preface within `--preface-timeout` is closed, so idle or
//! byte-dripping connections cannot hold those slots (TLS connections are
//! bounded by `--tls-handshake-timeout` first).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::BodyExt;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_stream::{Stream, StreamExt};
use tonic::{body::Body, transport::server::Connected};
use tower::{Layer, Service};

use crate::metrics;
use crate::rpc::status::CallError;

/// Paths never shed: probes and tooling must answer under any load.
const EXEMPT_PREFIXES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// How long accepting pauses after an accept error (e.g. EMFILE).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How much longer than `--request-timeout` a call may take here, so that
/// the handler's own timeout answers first when the call reached a handler.
const HANDLER_TIMEOUT_MARGIN: Duration = Duration::from_millis(100);

/// The tower layer that sheds calls beyond `max_calls` in flight.
#[derive(Clone)]
pub struct ShedLayer {
    slots: Arc<Semaphore>,
    max_calls: usize,
    request_timeout: Duration,
}

impl ShedLayer {
    pub fn new(max_calls: usize, request_timeout: Duration) -> ShedLayer {
        ShedLayer {
            slots: Arc::new(Semaphore::new(max_calls)),
            max_calls,
            request_timeout,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            slots: self.slots.clone(),
            max_calls: self.max_calls,
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    slots: Arc<Semaphore>,
    max_calls: usize,
    request_timeout: Duration,
}

/// The future of these tower services: boxed, as their outcomes differ in type.
pub(crate) type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if EXEMPT_PREFIXES
            .iter()
            .any(|prefix| path.starts_with(prefix))
        {
            return Box::pin(self.inner.call(request));
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            metrics::call_shed();
            let status = tonic::Status::from(CallError::Overloaded {
                max_calls: self.max_calls,
            });
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let slot = InFlight::new(slot);
        let response = self.inner.call(request);
        let timeout = self.request_timeout;
        Box::pin(async move {
            // A handler's own timeout (which also records the call) fires
            // first; this one catches what never reached a handler. Dropping
            // the call's future on expiry cancels it.
            let deadline = timeout + HANDLER_TIMEOUT_MARGIN;
            let Ok(response) = tokio::time::timeout(deadline, response).await else {
                return Ok(tonic::Status::from(CallError::Timeout(timeout)).into_http());
            };
            let response = response?;
            // The slot is held until the body (a whole stream) is done.
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &slot;
                    frame
                }))
            }))
        })
    }
}

/// A call's slot, counted in the in-flight gauge while held.
struct InFlight(#[allow(dead_code)] OwnedSemaphorePermit);

impl InFlight {
    fn new(permit: OwnedSemaphorePermit) -> InFlight {
        metrics::calls_in_flight(1);
        InFlight(permit)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::calls_in_flight(-1);
    }
}

/// Accepted connections beyond `max_connections` open are closed at once;
/// the others carry their slot until they close.
pub fn cap_connections<I>(
    incoming: I,
    max_connections: usize,
    preface_timeout: Duration,
) -> impl Stream<Item = io::Result<Counted>>
where
    I: Stream<Item = io::Result<TcpStream>>,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    incoming
        .then(|accepted| async {
            if let Err(error) = &accepted {
                // Out of descriptors, say: tonic retries at once, which
                // would spin; pause so connections can close meanwhile.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
            accepted
        })
        .filter_map(move |accepted| match accepted {
            Err(error) => Some(Err(error)),
            Ok(stream) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    metrics::connections_open(1);
                    Some(Ok(Counted {
                        stream,
                        _slot: slot,
                        preface: Some(Preface {
                            received: 0,
                            deadline: Box::pin(tokio::time::sleep(preface_timeout)),
                        }),
                    }))
                }
                Err(_) => {
                    metrics::connection_refused();
                    tracing::debug!(
                        peer = ?stream.peer_addr().ok(),
                        max_connections,
                        "connection refused: --max-connections reached"
                    );
                    None // dropping the stream closes it
                }
            },
        })
}

/// An accepted connection holding one of the `--max-connections` slots.
pub struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until the client's first 24 bytes (the HTTP/2 preface) have arrived.
    preface: Option<Preface>,
}

/// The client connection preface is `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;

struct Preface {
    received: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::connections_open(-1);
    }
}

impl Connected for Counted {
    type ConnectInfo = <TcpStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some(preface) = &mut this.preface else {
            return polled;
        };
        if let Poll::Ready(Ok(())) = &polled {
            preface.received += buf.filled().len() - before;
            if preface.received >= PREFACE_LEN {
                this.preface = None;
                return polled;
            }
        }
        // Polled on every read (a drip of bytes must not reset it), and
        // registered for a wake-up while the read is pending.
        if preface.deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!(peer = ?this.stream.peer_addr().ok(), "closing a connection: no HTTP/2 preface within --preface-timeout");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within --preface-timeout",
            )));
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
