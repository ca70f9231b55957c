//! Client-side helpers shared by `layerd-bench` and `layerd-cli`: connecting
//! with a clear error instead of a hang when the server is down, and sending
//! a bearer token.

use std::time::Duration;

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Channel, Endpoint},
    Request, Status,
};

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

/// An endpoint for `addr` (`host:port`, or a full `http://` URL).
pub fn endpoint(addr: &str, timeout: Duration) -> Result<Endpoint, String> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(url)
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true))
}

/// Connects one HTTP/2 connection, or says why not (with every cause).
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, String> {
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {}", endpoint.uri(), error_chain(&e)))
}

/// An error and its sources, `: `-separated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
