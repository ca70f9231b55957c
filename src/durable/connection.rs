//! The store's connection: one Redis (`redis://…`, reconnecting on its own)
//! or a Redis Cluster (`redis-cluster://host:port,host:port,…`, routed by
//! key slot; every key the scripts touch is hash-tagged by session, so each
//! script runs on one node). Pub/sub goes through the first node: a cluster
//! forwards classic PUBLISH messages to every node.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A handle on the store (cheap to clone).
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

const CLUSTER_SCHEME: &str = "redis-cluster://";

/// Connects to `url`; answers the connection and a client of one node, for
/// pub/sub. Errors name the flag.
pub async fn connect(url: &str) -> Result<(Connection, redis::Client), String> {
    let fail = |e: redis::RedisError| format!("--session-store: {e}");
    match url.strip_prefix(CLUSTER_SCHEME) {
        Some(nodes) => {
            let nodes = cluster_nodes(nodes);
            let first = nodes
                .first()
                .ok_or("--session-store: redis-cluster:// names no node")?;
            let node = redis::Client::open(first.as_str()).map_err(fail)?;
            let cluster = redis::cluster::ClusterClient::new(nodes.iter().map(String::as_str))
                .map_err(fail)?;
            let connection = cluster.get_async_connection().await.map_err(fail)?;
            Ok((Connection::Cluster(connection), node))
        }
        None => {
            let client = redis::Client::open(url).map_err(fail)?;
            let connection = ConnectionManager::new(client.clone()).await.map_err(fail)?;
            Ok((Connection::Single(connection), client))
        }
    }
}

/// `redis://` URLs of the nodes of `[USER:PASSWORD@]HOST:PORT,HOST:PORT,…`: the
/// credentials of the first node go to every node that names none.
fn cluster_nodes(nodes: &str) -> Vec<String> {
    let nodes: Vec<&str> = nodes.split(',').filter(|n| !n.is_empty()).collect();
    let credentials = nodes
        .first()
        .and_then(|n| n.rsplit_once('@'))
        .map(|(c, _)| c);
    nodes
        .iter()
        .map(|node| match credentials {
            Some(c) if !node.contains('@') => format!("redis://{c}@{node}"),
            _ => format!("redis://{node}"),
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
            cluster_nodes(":pw@a:1,b:2,user:x@c:3,"),
            ["redis://:pw@a:1", "redis://:pw@b:2", "redis://user:x@c:3"]
        );
        assert_eq!(cluster_nodes("a:1,b:2"), ["redis://a:1", "redis://b:2"]);
    }
}
