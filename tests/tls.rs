//! TLS and mutual TLS, with certificates generated here: a round trip over
//! TLS, a client certificate required and checked under `--tls-client-ca`,
//! plaintext refused by a TLS server, a stalled handshake cut off by
//! `--tls-handshake-timeout`, and the bundled tools (`layerd-cli`,
//! `layerd-bench`) over TLS and mutual TLS with their `--tls-*` options,
//! refused with a wrong CA or without a client certificate.

mod common;

use std::time::Duration;

use common::*;
use layerd::pb::{self, layer_service_client::LayerServiceClient};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::AsyncReadExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA, a server certificate for localhost / 127.0.0.1 and a client
/// certificate, as PEM files in a temporary directory.
struct Pki {
    dir: TempDir,
    ca: String,
    client: (String, String),
}

fn generate_pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let server = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let client = leaf(vec!["client.layerd.test".into()]);
    let dir = TempDir::new("layerd-tls");
    dir.write("server.pem", &server.0);
    dir.write("server.key", &server.1);
    dir.write("ca.pem", ca.pem());
    dir.write("client.pem", &client.0);
    dir.write("client.key", &client.1);
    Pki {
        dir,
        ca: ca.pem(),
        client,
    }
}

async fn tls_server(pki: &Pki, mutual: bool) -> TestServer {
    let dir = pki.dir.0.clone();
    start(move |c| {
        c.tls_cert = Some(dir.join("server.pem"));
        c.tls_key = Some(dir.join("server.key"));
        c.tls_client_ca = mutual.then(|| dir.join("ca.pem"));
        c.tls_handshake_timeout = Duration::from_millis(300);
    })
    .await
}

async fn tls_channel(
    server: &TestServer,
    pki: &Pki,
    with_client_cert: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client.0, &pki.client.1));
    }
    Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn round_trip(channel: Channel) -> Result<Vec<f32>, tonic::Status> {
    let mut client = LayerServiceClient::new(channel);
    let sid = client
        .create_session(pb::CreateSessionRequest::default())
        .await?
        .into_inner()
        .session_id;
    session_layer(&mut client, &sid).await?;
    let y = client
        .forward(pb::ForwardRequest {
            session_id: sid.clone(),
            layer_id: "relu".into(),
            x: Some(f32_tensor(&[3], &[1.0, -2.0, 3.5])),
            no_grad: false,
            ..Default::default()
        })
        .await?
        .into_inner()
        .y
        .unwrap();
    Ok(f32_values(&y))
}

async fn session_layer(client: &mut Client, sid: &str) -> Result<(), tonic::Status> {
    client
        .create_layer(pb::CreateLayerRequest {
            session_id: sid.into(),
            layer_id: "relu".into(),
            kind: "relu".into(),
            ..Default::default()
        })
        .await
        .map(drop)
}

#[tokio::test]
async fn a_tls_round_trip_and_plaintext_refused() {
    let pki = generate_pki();
    let server = tls_server(&pki, false).await;
    let channel = tls_channel(&server, &pki, false).await.unwrap();
    assert_eq!(round_trip(channel).await.unwrap(), [1.0, 0.0, 3.5]);
    // A plaintext HTTP/2 client gets no gRPC answer from a TLS port.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(round_trip(plain).await.is_err());
    }
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = generate_pki();
    let server = tls_server(&pki, true).await;
    let channel = tls_channel(&server, &pki, true).await.unwrap();
    assert_eq!(round_trip(channel).await.unwrap(), [1.0, 0.0, 3.5]);
    // Without a client certificate the handshake (or the first call) fails.
    match tls_channel(&server, &pki, false).await {
        Err(_) => {}
        Ok(channel) => assert!(round_trip(channel).await.is_err()),
    }
    // A certificate from another CA is refused too.
    let stranger = generate_pki();
    let foreign = Pki {
        client: stranger.client,
        ..pki
    };
    match tls_channel(&server, &foreign, true).await {
        Err(_) => {}
        Ok(channel) => assert!(round_trip(channel).await.is_err()),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_off() {
    let pki = generate_pki();
    let server = tls_server(&pki, false).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Send nothing: the server closes the connection after the 300 ms timeout.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "still open after 5 s: {read:?}"
    );
    server.stop().await;
}

/// Runs one of the bundled tools with `args`; (exit code, stdout + stderr).
async fn tool(binary: &str, args: &[&str]) -> (i32, String) {
    let output = tokio::process::Command::new(binary)
        .args(args)
        .env_remove("LAYERD_ADDR")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

const CLI: &str = env!("CARGO_BIN_EXE_layerd-cli");
const BENCH: &str = env!("CARGO_BIN_EXE_layerd-bench");

/// A verifying layerd-bench train run of 40 calls with these connection options.
async fn bench_over(addr: &str, options: &[&str]) -> (i32, String) {
    let run = [
        "--addr",
        addr,
        "--quiet",
        "--warmup",
        "0s",
        "--requests",
        "40",
    ];
    tool(BENCH, &[&run[..], options].concat()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_connect_over_tls_and_refuse_a_wrong_ca() {
    let pki = generate_pki();
    let server = tls_server(&pki, false).await;
    let ca = pki.dir.0.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let https = format!("https://localhost:{}", server.addr.port());
    let by_ip = server.addr.to_string();

    let (code, text) = tool(CLI, &["--addr", &https, "--tls-ca", ca, "health"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("SERVING"), "{text}");
    // host:port with a TLS option means TLS; the certificate also names 127.0.0.1.
    let (code, text) = tool(
        CLI,
        &["--addr", &by_ip, "--tls-ca", ca, "try", "relu", "1,-2,3.5"],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("y  = [1, 0, 3.5]"), "{text}");
    // --tls-server-name checks another name than the address's host.
    let (code, text) = tool(
        CLI,
        &[
            "--addr",
            &by_ip,
            "--tls-ca",
            ca,
            "--tls-server-name",
            "localhost",
            "kinds",
        ],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("relu"), "{text}");
    let (code, text) = bench_over(&https, &["--tls-ca", ca]).await;
    assert_eq!(code, 0, "{text}");

    // Another CA's certificate does not verify this server: unreachable (exit 2), said why.
    let stranger = generate_pki();
    let wrong_ca = stranger.dir.0.join("ca.pem");
    let wrong_ca = wrong_ca.to_str().unwrap();
    for binary in [CLI, BENCH] {
        let (code, text) = if binary == CLI {
            tool(CLI, &["--addr", &https, "--tls-ca", wrong_ca, "health"]).await
        } else {
            bench_over(&https, &["--tls-ca", wrong_ca]).await
        };
        assert_eq!(code, 2, "{text}");
        assert!(text.to_lowercase().contains("certificate"), "{text}");
    }
    // A server name the certificate lacks is refused too.
    let (code, text) = tool(
        CLI,
        &[
            "--addr",
            &https,
            "--tls-ca",
            ca,
            "--tls-server-name",
            "other.test",
            "health",
        ],
    )
    .await;
    assert_eq!(code, 2, "{text}");
    // Plaintext at a TLS port does not get through.
    let (code, text) = tool(CLI, &["--addr", &by_ip, "--timeout", "2s", "health"]).await;
    assert_ne!(code, 0, "{text}");
    // http:// with TLS options is a contradiction, said at once.
    let plain_url = format!("http://{by_ip}");
    let (code, text) = tool(CLI, &["--addr", &plain_url, "--tls-ca", ca, "health"]).await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("http://"), "{text}");
    let (code, text) = tool(
        CLI,
        &["--addr", &https, "--tls-ca", "/nonexistent.pem", "health"],
    )
    .await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--tls-ca"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_present_a_client_certificate_for_mutual_tls() {
    let pki = generate_pki();
    let server = tls_server(&pki, true).await;
    let path = |name: &str| pki.dir.0.join(name).to_str().unwrap().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let https = format!("https://localhost:{}", server.addr.port());
    let identity = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];

    let (code, text) = tool(
        CLI,
        &[&["--addr", &https][..], &identity, &["try", "sigmoid", "0"]].concat(),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("y  = [0.5]"), "{text}");
    let (code, text) = bench_over(&https, &identity).await;
    assert_eq!(code, 0, "{text}");

    // Without a client certificate the server refuses: nothing succeeds.
    let (code, text) = tool(
        CLI,
        &["--addr", &https, "--tls-ca", &ca, "try", "relu", "1"],
    )
    .await;
    assert_ne!(code, 0, "{text}");
    let (code, text) = bench_over(&https, &["--tls-ca", &ca]).await;
    assert_ne!(code, 0, "{text}");
    // A certificate from another CA neither.
    let stranger = generate_pki();
    let foreign = |name: &str| stranger.dir.0.join(name).to_str().unwrap().to_string();
    let (code, text) = tool(
        CLI,
        &[
            "--addr",
            &https,
            "--tls-ca",
            &ca,
            "--tls-cert",
            &foreign("client.pem"),
            "--tls-key",
            &foreign("client.key"),
            "try",
            "relu",
            "1",
        ],
    )
    .await;
    assert_ne!(code, 0, "{text}");
    // --tls-cert without --tls-key is a usage error.
    let (code, text) = tool(CLI, &["--addr", &https, "--tls-cert", &cert, "health"]).await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--tls-key"), "{text}");
    server.stop().await;
}
