//! The store's connection: one Redis (`redis://…`, or `rediss://…` over
//! TLS; reconnecting on its own) or a Redis Cluster
//! (`redis-cluster://host:port,host:port,…`, `rediss-cluster://` over TLS; routed by
//! key slot; every key the scripts touch is hash-tagged by session, so each
//! script runs on one node). Pub/sub goes through the first node: a cluster
//! forwards classic PUBLISH messages to every node.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, TlsCertificates, Value,
};

/// A handle on the store (cheap to clone).
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The cluster forms: plain, and TLS (`rediss-cluster://`).
const CLUSTER_SCHEMES: [(&str, &str); 2] = [
    ("redis-cluster://", "redis://"),
    ("rediss-cluster://", "rediss://"),
];

/// How to reach the store besides its URL.
#[derive(Default)]
pub struct Access {
    /// `--session-store-password-file`'s password, instead of the URL's.
    pub password: Option<String>,
    /// `--session-store-ca`: PEM CA certificates a `rediss://` server's
    /// certificate must chain to (else the system's roots).
    pub ca: Option<Vec<u8>>,
}

/// Connects to `url` as `access` says; answers the connection and a client
/// of one node, for pub/sub. Errors name the flag.
pub async fn connect(url: &str, access: &Access) -> Result<(Connection, redis::Client), String> {
    let password = access.password.as_deref();
    let tls = || TlsCertificates {
        client_tls: None,
        root_cert: access.ca.clone(),
    };
    let open = |info: ConnectionInfo| match access.ca {
        Some(_) => redis::Client::build_with_tls(info, tls()),
        None => redis::Client::open(info),
    };
    let fail = |e: redis::RedisError| format!("--session-store: {e}");
    let info = |url: &str| -> Result<ConnectionInfo, String> {
        let info = url.into_connection_info().map_err(fail)?;
        Ok(match password {
            Some(password) => {
                let redis = info.redis_settings().clone().set_password(password);
                info.set_redis_settings(redis)
            }
            None => info,
        })
    };
    let cluster = CLUSTER_SCHEMES
        .iter()
        .find_map(|(cluster, node)| url.strip_prefix(cluster).map(|nodes| (nodes, *node)));
    match cluster {
        Some((nodes, scheme)) => {
            let nodes = cluster_nodes(nodes, scheme)
                .iter()
                .map(|node| info(node))
                .collect::<Result<Vec<_>, _>>()?;
            let first = nodes
                .first()
                .ok_or("--session-store: redis-cluster:// names no node")?;
            let node = open(first.clone()).map_err(fail)?;
            let mut cluster = redis::cluster::ClusterClient::builder(nodes);
            if access.ca.is_some() {
                cluster = cluster.certs(tls());
            }
            let cluster = cluster.build().map_err(fail)?;
            let connection = cluster.get_async_connection().await.map_err(fail)?;
            Ok((Connection::Cluster(connection), node))
        }
        None => {
            let client = open(info(url)?).map_err(fail)?;
            let connection = ConnectionManager::new(client.clone()).await.map_err(fail)?;
            Ok((Connection::Single(connection), client))
        }
    }
}

/// `scheme` URLs of the nodes of `[USER:PASSWORD@]HOST:PORT,HOST:PORT,…`:
/// the credentials of the first node go to every node that names none.
fn cluster_nodes(nodes: &str, scheme: &str) -> Vec<String> {
    let nodes: Vec<&str> = nodes.split(',').filter(|n| !n.is_empty()).collect();
    let credentials = nodes
        .first()
        .and_then(|n| n.rsplit_once('@'))
        .map(|(c, _)| c);
    nodes
        .iter()
        .map(|node| match credentials {
            Some(c) if !node.contains('@') => format!("{scheme}{c}@{node}"),
            _ => format!("{scheme}{node}"),
        })
        .collect()
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_share_the_first_nodes_credentials() {
        assert_eq!(
            cluster_nodes(":pw@a:1,b:2,user:x@c:3,", "redis://"),
            ["redis://:pw@a:1", "redis://:pw@b:2", "redis://user:x@c:3"]
        );
        assert_eq!(
            cluster_nodes("a:1,b:2", "rediss://"),
            ["rediss://a:1", "rediss://b:2"]
        );
    }
}
