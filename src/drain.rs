//! Draining at shutdown: open grpc.health `Watch` streams end once the drain
//! begins (after they delivered NOT_SERVING), so a watching client or load
//! balancer does not hold the process for the whole grace period.
//!
//! Graceful shutdown waits for every open stream; a health Watch never ends
//! by itself, so without this one watcher would delay every exit by
//! `--shutdown-grace`.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::watch;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::overload::BoxFuture;

const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

/// Ends health Watch streams when `draining` turns true.
#[derive(Clone)]
pub struct EndWatchesLayer {
    draining: watch::Receiver<bool>,
}

impl EndWatchesLayer {
    pub fn new(draining: watch::Receiver<bool>) -> EndWatchesLayer {
        EndWatchesLayer { draining }
    }
}

impl<S> Layer<S> for EndWatchesLayer {
    type Service = EndWatches<S>;

    fn layer(&self, inner: S) -> EndWatches<S> {
        EndWatches {
            inner,
            draining: self.draining.clone(),
        }
    }
}

#[derive(Clone)]
pub struct EndWatches<S> {
    inner: S,
    draining: watch::Receiver<bool>,
}

impl<S, B> Service<http::Request<B>> for EndWatches<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let watching = request.uri().path() == WATCH_PATH;
        let response = self.inner.call(request);
        if !watching {
            return Box::pin(response);
        }
        let mut draining = self.draining.clone();
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                let drained = Box::pin(async move {
                    // An error means the server is gone: end as well.
                    let _ = draining.wait_for(|draining| *draining).await;
                });
                Body::new(EndOnDrain {
                    inner: body,
                    drained,
                    ended: false,
                })
            }))
        })
    }
}

/// A Watch response body that ends with UNAVAILABLE once the drain begins,
/// after handing on whatever the stream already had ready (NOT_SERVING).
struct EndOnDrain {
    inner: Body,
    drained: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ended: bool,
}

impl HttpBody for EndOnDrain {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.drained.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.ended = true;
        let mut trailers = HeaderMap::new();
        tonic::Status::unavailable("server shutting down").add_header(&mut trailers)?;
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
