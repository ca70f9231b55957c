//! Shared test support: a real layerd server on `127.0.0.1:0`, a tonic client
//! for it, and tensor helpers.
#![allow(dead_code)] // each test binary uses its own subset

pub mod kserve;

use std::{net::SocketAddr, time::Duration};

use layerd::config::Config;
use layerd::pb::{self, layer_service_client::LayerServiceClient};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{transport::Channel, Code, Status};
use tonic_types::StatusExt;

pub type Client = LayerServiceClient<Channel>;

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), layerd::server::BoxError>>,
}

/// Starts a server with `configure` applied to the built-in defaults.
pub async fn start(configure: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = Config::defaults();
    configure(&mut config);
    let listener = TcpListener::bind(config.addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(layerd::server::run(listener, config, async {
        let _ = stopped.await;
    }));
    TestServer {
        addr,
        stop: Some(stop),
        handle,
    }
}

impl TestServer {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> Client {
        LayerServiceClient::new(self.channel().await)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    /// Starts the graceful shutdown, as SIGTERM would.
    pub fn begin_shutdown(&mut self) {
        let _ = self.stop.take().expect("shutdown begins once").send(());
    }

    /// Shuts down and waits for `run` to return; returns how long that took.
    pub async fn stop(mut self) -> Duration {
        if self.stop.is_some() {
            self.begin_shutdown();
        }
        self.join().await
    }

    pub async fn join(self) -> Duration {
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("server stops within 30 s")
            .expect("server task did not panic")
            .expect("server returned Ok");
        started.elapsed()
    }
}

/// A directory of test files, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `contents` to the file `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tensor<T: bytemuck::Pod>(dtype: pb::DType, shape: &[u64], values: &[T]) -> pb::Tensor {
    pb::Tensor {
        dtype: dtype.into(),
        shape: shape.to_vec(),
        data: bytemuck::cast_slice::<T, u8>(values).to_vec().into(),
    }
}

fn values<T: bytemuck::Pod>(dtype: pb::DType, tensor: &pb::Tensor) -> Vec<T> {
    assert_eq!(tensor.dtype, dtype as i32);
    bytemuck::pod_collect_to_vec(&tensor.data)
}

pub fn f32_tensor(shape: &[u64], values: &[f32]) -> pb::Tensor {
    tensor(pb::DType::DtypeFloat32, shape, values)
}

pub fn f64_tensor(shape: &[u64], values: &[f64]) -> pb::Tensor {
    tensor(pb::DType::DtypeFloat64, shape, values)
}

pub fn f32_values(tensor: &pb::Tensor) -> Vec<f32> {
    values(pb::DType::DtypeFloat32, tensor)
}

pub fn f64_values(tensor: &pb::Tensor) -> Vec<f64> {
    values(pb::DType::DtypeFloat64, tensor)
}

/// Opens session `session_id` with one layer `layer_id` of `kind`.
pub async fn session_with_layer(client: &mut Client, session_id: &str, layer_id: &str, kind: &str) {
    client
        .create_session(pb::CreateSessionRequest {
            session_id: session_id.into(),
            idle_timeout_seconds: 0,
        })
        .await
        .unwrap();
    client
        .create_layer(pb::CreateLayerRequest {
            session_id: session_id.into(),
            layer_id: layer_id.into(),
            kind: kind.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

pub async fn forward(
    client: &mut Client,
    session_id: &str,
    layer_id: &str,
    x: pb::Tensor,
    no_grad: bool,
) -> Result<pb::Tensor, Status> {
    let request = pb::ForwardRequest {
        session_id: session_id.into(),
        layer_id: layer_id.into(),
        x: Some(x),
        no_grad,
        ..Default::default()
    };
    Ok(client
        .forward(request)
        .await?
        .into_inner()
        .y
        .expect("y is set"))
}

pub async fn backward(
    client: &mut Client,
    session_id: &str,
    layer_id: &str,
    dout: pb::Tensor,
) -> Result<pb::Tensor, Status> {
    let request = pb::BackwardRequest {
        session_id: session_id.into(),
        layer_id: layer_id.into(),
        dout: Some(dout),
        ..Default::default()
    };
    Ok(client
        .backward(request)
        .await?
        .into_inner()
        .dx
        .expect("dx is set"))
}

/// Asserts `result` failed with `code` and the `ErrorInfo` reason `reason`,
/// and that the message contains every one of `words`.
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    reason: &str,
    words: &[&str],
) {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_error_details()
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "layerd.v1");
    for word in words {
        assert!(
            status.message().contains(word),
            "{word:?} not in {:?}",
            status.message()
        );
    }
}
