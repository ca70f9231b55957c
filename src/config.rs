//! Server configuration: every flag is also a `LAYERD_*` environment variable,
//! and `layerd --help` shows every default.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bytesize::ByteSize;
use clap::{Parser, ValueEnum};

use crate::durable::{Access, Durability};
use crate::session::Limits;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// layerd: neural-network layers (Forward now, Backward later) over gRPC.
///
/// Durations take units (`90s`, `5m`, `1h`); sizes take units (`64MiB`, `4GiB`).
/// The log filter is read from RUST_LOG (default `info`).
#[derive(Debug, Clone, Parser)]
#[command(name = "layerd", version, about, long_about)]
pub struct Config {
    /// Address to listen on for gRPC (layerd.v1, the KServe v2 inference protocol,
    /// grpc.health.v1, reflection).
    #[arg(long, env = "LAYERD_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: SocketAddr,

    /// PEM certificate chain: serve gRPC over TLS (with --tls-key). Plaintext without it.
    #[arg(long, env = "LAYERD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "LAYERD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: require client certificates signed by one of them (mutual TLS).
    #[arg(long, env = "LAYERD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Longest a TLS handshake may take before the connection is closed.
    #[arg(long, env = "LAYERD_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// File of `TOKEN PRINCIPAL` lines: require `authorization: Bearer TOKEN` on the layer and
    /// KServe services (health and reflection stay open); each principal sees only its own sessions.
    #[arg(long, env = "LAYERD_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// Address for the Prometheus text endpoint (`GET /metrics`, plain HTTP); off unless set.
    #[arg(long, env = "LAYERD_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log line format.
    #[arg(long, env = "LAYERD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Threads that serve connections and compute small calls (the async runtime's workers);
    /// default: one per core the process may use. Large computations and large training steps
    /// run on threads of their own besides these, so a server sharing its cores with busy
    /// clients or other processes may do better with fewer (docs/benchmarks.md, "Training
    /// through the service").
    #[arg(long, env = "LAYERD_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<std::num::NonZeroUsize>,

    /// Idle timeout granted when a client asks for 0 (whole seconds).
    #[arg(long, env = "LAYERD_DEFAULT_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_idle_timeout)]
    pub default_idle_timeout: Duration,

    /// Largest idle timeout granted; larger requests are lowered to it (whole seconds).
    #[arg(long, env = "LAYERD_MAX_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_idle_timeout)]
    pub max_idle_timeout: Duration,

    /// Most sessions open at once.
    #[arg(long, env = "LAYERD_MAX_SESSIONS", default_value_t = 10_000)]
    pub max_sessions: usize,

    /// Most layer instances in one session.
    #[arg(long, env = "LAYERD_MAX_LAYERS_PER_SESSION", default_value_t = 1_024)]
    pub max_layers_per_session: usize,

    /// Most bytes one session holds: state kept for Backward (ReLU: 1 bit per element; Sigmoid:
    /// y), and its layers' parameters, gradients and buffers.
    #[arg(long, env = "LAYERD_MAX_SESSION_KEPT_BYTES", default_value = "1GiB")]
    pub max_session_kept_bytes: ByteSize,

    /// Most bytes all sessions together hold (kept state, parameters, gradients, buffers).
    #[arg(long, env = "LAYERD_MAX_TOTAL_KEPT_BYTES", default_value = "4GiB")]
    pub max_total_kept_bytes: ByteSize,

    /// Largest gRPC message accepted or sent (a tensor's bytes plus a few bytes of framing).
    #[arg(long, env = "LAYERD_MAX_MESSAGE_BYTES", default_value = "64MiB")]
    pub max_message_bytes: ByteSize,

    /// Largest array one call may build: a layer's output inside a sequential, or a
    /// convolution's im2col scratch (its input unrolled, kernel_h·kernel_w times its size).
    #[arg(long, env = "LAYERD_MAX_WORK_BYTES", default_value = "1GiB")]
    pub max_work_bytes: ByteSize,

    /// Server-side limit on the time one call (or one Run step) may take.
    #[arg(long, env = "LAYERD_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Most calls in flight in the whole process (a stream counts once while open); beyond it
    /// calls are refused at once with UNAVAILABLE (reason OVERLOADED) without running.
    /// grpc.health and reflection are exempt.
    #[arg(long, env = "LAYERD_MAX_CONCURRENT_CALLS", default_value_t = 512)]
    pub max_concurrent_calls: usize,

    /// Most client connections open at once; further ones are closed on accept.
    #[arg(long, env = "LAYERD_MAX_CONNECTIONS", default_value_t = 4_096)]
    pub max_connections: usize,

    /// HTTP/2: most concurrent streams (calls) per connection.
    #[arg(long, env = "LAYERD_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// HTTP/2: most streams a connection may have reset by server-side protocol errors
    /// before it is closed (guards against reset floods).
    #[arg(
        long,
        env = "LAYERD_MAX_LOCAL_ERROR_RESET_STREAMS",
        default_value_t = 1_024
    )]
    pub max_local_error_reset_streams: usize,

    /// HTTP/2: most streams reset by the client but not yet accepted
    /// (guards against Rapid Reset, CVE-2023-44487).
    #[arg(
        long,
        env = "LAYERD_MAX_PENDING_ACCEPT_RESET_STREAMS",
        default_value_t = 20
    )]
    pub max_pending_accept_reset_streams: usize,

    /// HTTP/2: flow-control window of one stream (call): how much a client may send
    /// before the server has read it. Large tensors need a large window to stream at speed.
    #[arg(long, env = "LAYERD_INITIAL_STREAM_WINDOW", default_value = "4MiB")]
    pub initial_stream_window: ByteSize,

    /// HTTP/2: flow-control window of a whole connection: bounds what one
    /// connection can make the server buffer.
    #[arg(
        long,
        env = "LAYERD_INITIAL_CONNECTION_WINDOW",
        default_value = "16MiB"
    )]
    pub initial_connection_window: ByteSize,

    /// HTTP/2: size the flow-control windows from measured bandwidth-delay product (BDP) pings
    /// instead of --initial-stream-window / --initial-connection-window: windows start at 64 KiB
    /// and grow while a connection can use them.
    #[arg(long, env = "LAYERD_HTTP2_ADAPTIVE_WINDOW")]
    pub http2_adaptive_window: bool,

    /// HTTP/2: largest frame the server accepts (16KiB to 16777215 bytes, HTTP/2's
    /// bounds); fewer, larger frames cost less per byte for large tensors.
    #[arg(long, env = "LAYERD_MAX_FRAME_SIZE", default_value = "1MiB", value_parser = parse_frame_size)]
    pub max_frame_size: ByteSize,

    /// Longest a new connection may take to send the HTTP/2 connection preface before it is
    /// closed (guards against idle and byte-dripping connections holding --max-connections).
    #[arg(long, env = "LAYERD_PREFACE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub preface_timeout: Duration,

    /// HTTP/2: interval between keepalive PINGs on idle connections.
    #[arg(long, env = "LAYERD_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// HTTP/2: how long to wait for a keepalive PING's answer before closing the connection.
    #[arg(long, env = "LAYERD_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// On SIGTERM/SIGINT: how long to keep serving after health turns NOT_SERVING, before the
    /// listener closes, so load balancers that poll health stop routing here first.
    #[arg(long, env = "LAYERD_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// On SIGTERM/SIGINT: how long in-flight calls may take to finish before the process exits.
    #[arg(long, env = "LAYERD_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// This replica's name, as DescribeSession and the logs give it (default: the host name,
    /// which is the pod's name in Kubernetes).
    #[arg(long, env = "LAYERD_REPLICA_ID", value_name = "ID")]
    pub replica_id: Option<String>,

    /// Keep every session in a shared Redis store (`redis://[:PASSWORD@]HOST:PORT[/DB]`, or
    /// `redis-cluster://[:PASSWORD@]HOST:PORT,HOST:PORT,...` for a Redis Cluster), so that any
    /// replica can serve any session: a call for a session another replica holds takes it over,
    /// and a replica's death or a rollout loses no session. Off by default.
    #[arg(
        long,
        env = "LAYERD_SESSION_STORE",
        value_name = "URL",
        conflicts_with = "state_dir"
    )]
    pub session_store: Option<String>,

    /// With --session-store: a file holding Redis's password (its first line; a Kubernetes
    /// Secret mounted as a file, say), used instead of a password in the URL.
    #[arg(
        long,
        env = "LAYERD_SESSION_STORE_PASSWORD_FILE",
        value_name = "FILE",
        requires = "session_store"
    )]
    pub session_store_password_file: Option<PathBuf>,

    /// With a `rediss://` --session-store: PEM CA certificates the server's certificate must
    /// chain to (default: the system's roots).
    #[arg(
        long,
        env = "LAYERD_SESSION_STORE_CA",
        value_name = "FILE",
        requires = "session_store"
    )]
    pub session_store_ca: Option<PathBuf>,

    /// With --session-store: `sync` answers a call that changed parameters or optimizer state
    /// only once the store has the new state (a crash loses no answered step); `async` answers
    /// at once and writes the newest state behind (a crash may lose the last steps; clients
    /// resume from DescribeSession's counts).
    #[arg(long, env = "LAYERD_DURABILITY", value_enum, default_value_t = Durability::Sync, requires = "session_store")]
    pub durability: Durability,

    /// Keep sessions that hold parameters across restarts: the shutdown drain writes each to this
    /// directory (created if missing), and the next start reads them back with their ids, owners
    /// and remaining idle time. Off by default.
    #[arg(long, env = "LAYERD_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,

    /// With --state-dir: also write the sessions this often (e.g. 30s), so that a crash or a
    /// SIGKILL loses at most this much training. Off by default: only the drain writes them.
    #[arg(long, env = "LAYERD_SNAPSHOT_INTERVAL", value_parser = positive_duration, requires = "state_dir")]
    pub snapshot_interval: Option<Duration>,

    /// Serve Triton's system shared-memory extension: clients may register POSIX
    /// shared-memory objects under /dev/shm and name them as inputs and outputs. Off by
    /// default, as in Triton: a service on a shared host must not open segments it is told to.
    #[arg(long, env = "LAYERD_ALLOW_CLIENT_SHM")]
    pub allow_client_shm: bool,

    /// Most shared-memory regions registered at once, all clients together.
    #[arg(long, env = "LAYERD_MAX_SHM_REGIONS", default_value_t = 256)]
    pub max_shm_regions: usize,
}

/// A duration above zero.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d > Duration::ZERO => Ok(d),
        Ok(_) => Err("must be above 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Idle timeouts travel as whole seconds (`uint32`), so they must be ≥ 1 s.
fn parse_idle_timeout(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.subsec_nanos() != 0 || duration.is_zero() || duration.as_secs() > u32::MAX as u64 {
        return Err(format!("expected whole seconds from 1s to {}s", u32::MAX));
    }
    Ok(duration)
}

/// HTTP/2 frames are 2^14 to 2^24 - 1 bytes (RFC 9113 §6.5.2); h2 panics on
/// a setting outside, on every connection, so it is refused at start.
fn parse_frame_size(text: &str) -> Result<ByteSize, String> {
    const BOUNDS: std::ops::RangeInclusive<u64> = (1 << 14)..=(1 << 24) - 1;
    let size: ByteSize = text.parse()?;
    if !BOUNDS.contains(&size.as_u64()) {
        return Err(format!(
            "expected {} to {} bytes (16KiB to 16MiB - 1, HTTP/2's bounds), got {} bytes",
            BOUNDS.start(),
            BOUNDS.end(),
            size.as_u64()
        ));
    }
    Ok(size)
}

impl Config {
    /// The password of `--session-store-password-file` (its first line) and
    /// the CA certificates of `--session-store-ca`, read.
    pub fn session_store_access(&self) -> Result<Access, String> {
        let read = |path: &std::path::Path, flag: &str| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let password = match &self.session_store_password_file {
            None => None,
            Some(path) => {
                let text = read(path, "--session-store-password-file")?;
                let text = String::from_utf8_lossy(&text);
                let password = text.lines().next().unwrap_or_default().to_string();
                if password.is_empty() {
                    return Err(format!(
                        "--session-store-password-file {}: empty first line",
                        path.display()
                    ));
                }
                Some(password)
            }
        };
        let ca = match &self.session_store_ca {
            None => None,
            Some(path) => Some(read(path, "--session-store-ca")?),
        };
        Ok(Access { password, ca })
    }

    /// `--replica-id`, or the host name.
    pub fn replica_id(&self) -> String {
        self.replica_id
            .clone()
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }

    /// The built-in defaults (plus any `LAYERD_*` variables, as for the
    /// binary), listening on an ephemeral loopback port: for tests and embedding.
    pub fn defaults() -> Config {
        let mut config = Config::parse_from(["layerd"]);
        config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config
    }

    /// The session limits these flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            max_sessions: self.max_sessions,
            max_layers_per_session: self.max_layers_per_session,
            max_session_kept_bytes: self.max_session_kept_bytes.as_u64(),
            max_total_kept_bytes: self.max_total_kept_bytes.as_u64(),
            max_work_bytes: self.max_work_bytes.as_u64(),
            default_idle_timeout: self.default_idle_timeout,
            max_idle_timeout: self.max_idle_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent_and_every_one_has_an_env_var() {
        Config::command().debug_assert();
        for arg in Config::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{id} has no env var"));
            assert_eq!(
                env.to_str().unwrap(),
                format!("LAYERD_{}", id.to_uppercase())
            );
        }
    }

    #[test]
    fn every_flag_has_a_row_in_the_readme_configuration_table() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("## Configuration")
            .expect("README has a Configuration section");
        let table = &readme[start..];
        let table = &table[..table[3..].find("\n## ").map_or(table.len(), |end| end + 3)];
        for arg in Config::command().get_arguments() {
            let Some(long) = arg.get_long().filter(|l| *l != "help" && *l != "version") else {
                continue;
            };
            let flag = format!("`--{long}`");
            let env = format!("`{}`", arg.get_env().unwrap().to_str().unwrap());
            assert!(
                table
                    .lines()
                    .any(|l| l.starts_with('|') && l.contains(&flag) && l.contains(&env)),
                "README's Configuration table has no row for {flag} ({env})"
            );
        }
    }

    #[test]
    fn sizes_and_durations_parse_with_units() {
        let config = Config::try_parse_from([
            "layerd",
            "--max-message-bytes=128MiB",
            "--default-idle-timeout=90s",
            "--request-timeout=1500ms",
        ])
        .unwrap();
        assert_eq!(config.max_message_bytes.as_u64(), 128 << 20);
        assert_eq!(config.default_idle_timeout, Duration::from_secs(90));
        assert_eq!(config.request_timeout, Duration::from_millis(1500));
        assert!(Config::try_parse_from(["layerd", "--default-idle-timeout=1500ms"]).is_err());
        assert!(Config::try_parse_from(["layerd", "--max-idle-timeout=0s"]).is_err());
        let workers = Config::try_parse_from(["layerd", "--worker-threads=1"]).unwrap();
        assert_eq!(workers.worker_threads.map(|n| n.get()), Some(1));
        assert!(Config::try_parse_from(["layerd", "--worker-threads=0"]).is_err());
        let frames = Config::try_parse_from(["layerd", "--max-frame-size=16777215"]).unwrap();
        assert_eq!(frames.max_frame_size.as_u64(), (1 << 24) - 1);
        assert!(Config::try_parse_from(["layerd", "--max-frame-size=16KiB"]).is_ok());
        for outside in ["16MiB", "16383"] {
            let arg = format!("--max-frame-size={outside}");
            let error = Config::try_parse_from(["layerd", &arg]).unwrap_err();
            assert!(error.to_string().contains("16777215"), "{error}");
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::defaults();
        assert_eq!(config.max_message_bytes.as_u64(), 64 << 20);
        assert_eq!(config.default_idle_timeout, Duration::from_secs(300));
        assert_eq!(config.limits().max_sessions, 10_000);
    }
}
