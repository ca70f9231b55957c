//! Assembles and runs the gRPC server: the layer service, the KServe v2 /
//! Triton inference service, grpc.health.v1,
//! reflection (v1 and v1alpha), the HTTP/2 guards, and graceful shutdown
//! bounded by a grace period.

use std::{future::Future, time::Duration};

use http::HeaderMap;
use tokio::net::TcpListener;
use tonic::{
    codec::CompressionEncoding,
    server::NamedService,
    service::{interceptor::InterceptedService, Routes},
    transport::{server::TcpIncoming, Certificate, Identity, ServerTlsConfig},
    Status,
};
use tonic_health::ServingStatus;

use crate::api::LayerService;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::drain::EndWatchesLayer;
use crate::durable::Durable;
use crate::kserve::{arrival::ArrivalLayer, wire::DirectInfer, InferenceService};
use crate::overload::{cap_connections, ShedLayer};
use crate::pb::{
    self, inference::grpc_inference_service_server::GrpcInferenceServiceServer,
    layer_service_server::LayerServiceServer,
};
use crate::persist;
use crate::rpc::stream::oversize_to_resource_exhausted;
use crate::session::Store;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `--max-message-bytes` both ways, and gzip-compressed requests accepted
/// (grpcio's channel option, say; the limit applies to the decompressed size),
/// on a generated server (each service's server is its own type).
macro_rules! limited {
    ($server:expr, $config:expr) => {{
        let max = usize::try_from($config.max_message_bytes.as_u64()).unwrap_or(usize::MAX);
        $server
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
            .accept_compressed(CompressionEncoding::Gzip)
    }};
}

/// Binds `config.addr` and serves until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> Result<(), BoxError> {
    // Handlers first: once the port is bound, connections are accepted (and a
    // signal may follow) before `run` is first polled.
    let shutdown = crate::signal::terminate();
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
    run(listener, config, shutdown).await
}

/// Serves on `listener` until `shutdown` completes, then drains: health turns
/// NOT_SERVING, after `config.shutdown_delay` the listener closes (and health
/// Watch streams end), in-flight calls get up to `config.shutdown_grace` to
/// finish, and whatever is left is cut off.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    let local_addr = listener.local_addr()?;
    // Bound before serving gRPC, so a bad --metrics-addr fails at start.
    let metrics_task = start_metrics(&config).await?;
    let authenticator = match &config.auth_tokens {
        Some(path) => Authenticator::from_file(path)?,
        None => Authenticator::open(),
    };
    let store_guard = Store::start(config.limits());
    // Sessions of the last run, before the port opens.
    let snapshots = match &config.state_dir {
        Some(dir) => {
            Some(start_state_dir(&store_guard.store(), dir, config.snapshot_interval).await?)
        }
        None => None,
    };
    let durable = match &config.session_store {
        Some(url) => Some(
            Durable::connect(
                url,
                &config.session_store_access()?,
                config.replica_id(),
                config.durability,
                store_guard.store(),
            )
            .await?,
        ),
        None => None,
    };
    let inference = InferenceService::new(store_guard.store(), &config);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<LayerServiceServer<LayerService>>()
        .await;
    health
        .set_serving::<GrpcInferenceServiceServer<InferenceService>>()
        .await;

    let (begin_drain, draining) = tokio::sync::watch::channel(false);
    let mut builder = http2_guarded(tonic::transport::Server::builder(), &config);
    if let Some(tls) = tls_config(&config)? {
        builder = builder.tls_config(tls)?;
    }
    let max_message_bytes = config.max_message_bytes.as_u64();
    let router = builder
        // Outermost: it numbers the copies of the stack (kserve::arrival).
        .layer(ArrivalLayer)
        .layer(EndWatchesLayer::new(draining))
        .layer(ShedLayer::new(
            config.max_concurrent_calls,
            config.request_timeout,
        ))
        .layer(tower::util::MapResponseLayer::new(
            move |response: http::Response<tonic::body::Body>| {
                rewrite_oversize_status(response, max_message_bytes)
            },
        ))
        .add_routes(Routes::new(InterceptedService::new(
            limited!(
                LayerServiceServer::new(LayerService::new(
                    store_guard.store(),
                    config.request_timeout,
                    config.max_message_bytes.as_u64(),
                    config.replica_id(),
                    durable.clone(),
                )),
                config
            ),
            authenticator.clone(),
        )))
        .add_service(InterceptedService::new(
            DirectInfer::new(
                limited!(GrpcInferenceServiceServer::new(inference.clone()), config),
                inference.clone(),
                usize::try_from(max_message_bytes).unwrap_or(usize::MAX),
            ),
            authenticator.clone(),
        ))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);

    let incoming = cap_connections(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        config.max_connections,
        config.preface_timeout,
    );
    let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = accepting_stopped.await;
    }));
    log_serving(local_addr, &config, &authenticator);

    tokio::select! {
        finished = &mut server => return finished?.map_err(Into::into),
        () = shutdown => {}
    }

    tracing::info!(delay = ?config.shutdown_delay, grace = ?config.shutdown_grace, "shutting down: health NOT_SERVING");
    inference.set_not_ready();
    for service in [
        "",
        <LayerServiceServer<LayerService> as NamedService>::NAME,
        <GrpcInferenceServiceServer<InferenceService> as NamedService>::NAME,
    ] {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    // Still serving, NOT_SERVING: load balancers polling health move away.
    tokio::select! {
        finished = &mut server => return finished?.map_err(Into::into),
        () = tokio::time::sleep(config.shutdown_delay) => {}
    }
    tracing::info!("draining: listener closed, in-flight calls finishing");
    let _ = begin_drain.send(true);
    let _ = stop_accepting.send(());
    match tokio::time::timeout(config.shutdown_grace, &mut server).await {
        Ok(finished) => finished??,
        Err(_) => {
            tracing::warn!(grace = ?config.shutdown_grace, "calls still in flight after the grace period: cutting them off");
            server.abort();
        }
    }
    if let Some(durable) = &durable {
        let count = durable.hand_over_all().await;
        tracing::info!(
            sessions = count,
            "sessions written to the session store and released"
        );
    }
    if let Some((dir, periodic)) = snapshots {
        drop(periodic);
        match persist::save(&store_guard.store(), &dir).await {
            Ok(count) => tracing::info!(dir = %dir.display(), sessions = count, "sessions saved"),
            Err(error) => tracing::error!(dir = %dir.display(), %error, "cannot save the sessions"),
        }
    }
    drop(store_guard);
    drop(metrics_task);
    tracing::info!("layerd stopped");
    Ok(())
}

/// `--state-dir`: creates it if missing, restores the sessions saved in it,
/// and with `--snapshot-interval` starts the task that saves them
/// periodically (stopped when dropped).
async fn start_state_dir(
    store: &Store,
    dir: &std::path::Path,
    interval: Option<Duration>,
) -> Result<(std::path::PathBuf, Option<AbortOnDrop<()>>), BoxError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot use --state-dir {}: {e}", dir.display()))?;
    let restored = persist::load(store, dir)
        .await
        .map_err(|e| format!("cannot read --state-dir {}: {e}", dir.display()))?;
    tracing::info!(dir = %dir.display(), sessions = restored, "state directory read");
    let periodic = interval.map(|every| {
        let (store, dir) = (store.clone(), dir.to_path_buf());
        AbortOnDrop(tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(error) = persist::save(&store, &dir).await {
                    tracing::error!(dir = %dir.display(), %error, "cannot snapshot the sessions");
                }
            }
        }))
    });
    Ok((dir.to_path_buf(), periodic))
}

/// The Prometheus endpoint on `--metrics-addr`, if set; stops when dropped.
async fn start_metrics(config: &Config) -> Result<Option<AbortOnDrop<()>>, BoxError> {
    let Some(addr) = config.metrics_addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} for metrics: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics serving");
    let handle = crate::metrics::recorder()?;
    Ok(Some(AbortOnDrop(tokio::spawn(async move {
        if let Err(error) = crate::metrics::serve(listener, handle, std::future::pending()).await {
            tracing::error!(%error, "metrics endpoint failed");
        }
    }))))
}

/// HTTP/2 settings: tonic 0.14 leaves some unset, which removes h2's own
/// protections; windows and frames are raised so large tensors stream at speed.
fn http2_guarded(builder: tonic::transport::Server, config: &Config) -> tonic::transport::Server {
    builder
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_max_local_error_reset_streams(Some(config.max_local_error_reset_streams))
        .http2_max_pending_accept_reset_streams(Some(config.max_pending_accept_reset_streams))
        .initial_stream_window_size(window(config.initial_stream_window))
        .initial_connection_window_size(window(config.initial_connection_window))
        .max_frame_size(window(config.max_frame_size))
        .http2_adaptive_window(Some(config.http2_adaptive_window))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
}

fn log_serving(addr: std::net::SocketAddr, config: &Config, authenticator: &Authenticator) {
    let tls = match (&config.tls_cert, &config.tls_client_ca) {
        (None, _) => "off",
        (Some(_), None) => "on",
        (Some(_), Some(_)) => "mutual",
    };
    let auth = if authenticator.is_enabled() {
        "bearer"
    } else {
        "off"
    };
    let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(%addr, tls, auth, worker_threads, "layerd serving");
}

fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, BoxError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let mut tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(cert, "--tls-cert")?,
            read(key, "--tls-key")?,
        ))
        .timeout(config.tls_handshake_timeout);
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?));
    }
    Ok(Some(tls))
}

/// A task that ends with its owner (the metrics endpoint, with the server).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An HTTP/2 window or frame size: at most 2^31 - 1 by the protocol.
fn window(size: bytesize::ByteSize) -> u32 {
    size.as_u64().min(i32::MAX as u64) as u32
}

/// Reflection over every service served, both reflection versions, and the
/// `google.rpc` error details, so grpcurl can also decode error details.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    [
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    .fold(
        tonic_reflection::server::Builder::configure().include_reflection_service(false),
        |builder, set| builder.register_encoded_file_descriptor_set(set),
    )
}

/// A unary call whose request exceeds the message limit is answered by tonic
/// itself (trailers-only, OUT_OF_RANGE) before any handler runs; give it the
/// RESOURCE_EXHAUSTED status every other limit answers with.
fn rewrite_oversize_status(
    mut response: http::Response<tonic::body::Body>,
    max_message_bytes: u64,
) -> http::Response<tonic::body::Body> {
    let headers: &mut HeaderMap = response.headers_mut();
    if headers.get("grpc-status").is_some_and(|code| code == "11") {
        if let Some(status) = Status::from_header_map(headers) {
            let status = oversize_to_resource_exhausted(status, max_message_bytes);
            if status.code() != tonic::Code::OutOfRange {
                headers.remove("grpc-status-details-bin");
                let _ = status.add_header(headers);
            }
        }
    }
    response
}
