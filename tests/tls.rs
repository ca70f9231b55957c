//! TLS and mutual TLS, with certificates generated here: a round trip over
//! TLS, a client certificate required and checked under `--tls-client-ca`,
//! plaintext refused by a TLS server, and a stalled handshake cut off by
//! `--tls-handshake-timeout`.

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
