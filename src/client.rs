//! Client-side helpers shared by `layerd-bench` and `layerd-cli`: connecting
//! (plaintext, TLS or mutual TLS) with a clear error instead of a hang when the
//! server is down, and sending a bearer token.
//!
//! TLS is on when the address is `https://…` or any `--tls-*` option is given;
//! without `--tls-ca` the server is verified against the system's roots.

use std::{path::PathBuf, time::Duration};

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Request, Status,
};

/// The client's TLS options, flattened into each tool's command line. Their
/// variables differ from the server's `LAYERD_TLS_*` so that a shell (or a
/// container) running both does not hand the server's key to the client.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM CA certificate(s) to verify the server with (turns TLS on; default with
    /// an https:// address: the system's roots).
    #[arg(long, env = "LAYERD_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate chain, for a server that requires mutual TLS (with --tls-key).
    #[arg(
        long,
        env = "LAYERD_TLS_CLIENT_CERT",
        requires = "tls_key",
        global = true
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "LAYERD_TLS_CLIENT_KEY",
        requires = "tls_cert",
        global = true
    )]
    pub tls_key: Option<PathBuf>,

    /// Name the server's certificate must carry (default: the address's host),
    /// e.g. when connecting to an ingress by IP address.
    #[arg(long, env = "LAYERD_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    fn wanted(&self) -> bool {
        self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_server_name.is_some()
    }

    /// The rustls client configuration these options describe.
    fn config(&self) -> Result<ClientTlsConfig, String> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
        };
        let mut tls = ClientTlsConfig::new();
        tls = match &self.tls_ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
}

/// Adds `authorization: Bearer <token>` to every call; nothing without a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        token
            .map(|token| {
                MetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| "the token must be printable ASCII".to_string())
            })
            .transpose()
            .map(Bearer)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An endpoint for `addr` (`host:port`, or an `http://` / `https://` URL),
/// over TLS when the URL says `https://` or `tls` asks for it.
pub fn endpoint(addr: &str, timeout: Duration, tls: &TlsArgs) -> Result<Endpoint, String> {
    let url = match addr.split_once("://") {
        Some(("http", _)) if tls.wanted() => {
            return Err(format!(
                "the address {addr:?} says http:// (plaintext) but TLS options are given: \
                 use https:// or host:port"
            ))
        }
        Some(("http" | "https", _)) => addr.to_string(),
        Some((scheme, _)) => {
            return Err(format!(
                "bad address {addr:?}: the scheme must be http or https, not {scheme:?}"
            ))
        }
        None if tls.wanted() => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    if endpoint.uri().scheme_str() == Some("https") {
        endpoint
            .tls_config(tls.config()?)
            .map_err(|e| format!("TLS settings: {}", error_chain(&e)))
    } else {
        Ok(endpoint)
    }
}

/// Connects one HTTP/2 connection, or says why not (with every cause).
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, String> {
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {}", endpoint.uri(), error_chain(&e)))
}

/// A failed call's status for people: code, message and the transport error
/// behind it, if any (a refused client certificate, a plaintext client at a TLS
/// port), with a hint for the usual TLS mistakes.
pub fn status_text(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(": ");
        text.push_str(&error_chain(source));
    }
    let lower = text.to_lowercase();
    if lower.contains("certificaterequired") || lower.contains("certificate required") {
        text.push_str(" (the server requires a client certificate: --tls-cert and --tls-key)");
    } else if status.code() == tonic::Code::Cancelled || lower.contains("frame with invalid size") {
        text.push_str(" (is the server serving TLS? then use https:// or --tls-ca)");
    }
    text
}

/// An error and its sources, `: `-separated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Many errors print their source in their own message already.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
