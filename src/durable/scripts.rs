//! The store's keys and the Lua scripts that change them atomically.
//!
//! A session is one Redis hash, `layerd:session:{<owner in hex>:<id>}` (the
//! braces are a Redis Cluster hash tag: one key, one slot), with the fields
//! `epoch` (a decimal count of take-overs), `holder` (the holding replica's
//! id, `""` once released), `owner`, `id`, `idle` (seconds), `state` (the
//! checkpoint) and `answers` (the last numbered step of each optimizer). Its
//! TTL is the session's idle timeout. A replica's heartbeat is
//! `layerd:replica:<id>`, with a short TTL; a replica hears handover requests
//! on the channel `layerd:handover:<id>`.
//!
//! Every script that writes is conditional: `create` on the key not
//! existing, `write` and `delete` on the epoch and holder the writer took the
//! session with (fencing), `take` on the epoch the taker read.

use std::sync::LazyLock;

use redis::Script;

use crate::auth::Principal;

/// The session's hash.
pub fn session_key(owner: &Principal, id: &str) -> String {
    let owner: String = owner.name().bytes().map(|b| format!("{b:02x}")).collect();
    format!("layerd:session:{{{owner}:{id}}}")
}

/// A replica's heartbeat.
pub fn heartbeat_key(replica: &str) -> String {
    format!("layerd:replica:{replica}")
}

/// The channel a replica hears handover requests on.
pub fn handover_channel(replica: &str) -> String {
    format!("layerd:handover:{replica}")
}

/// KEYS: the session. ARGV: holder, owner, id, idle seconds, state, TTL in ms.
/// Creates the session at epoch 1 held by ARGV[1]; 0 if it exists.
pub static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'epoch', '1', 'holder', ARGV[1], 'owner', ARGV[2], 'id', ARGV[3],
           'idle', ARGV[4], 'state', ARGV[5], 'answers', '')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
",
    )
});

/// KEYS: the session. ARGV: epoch, holder, state, answers, TTL in ms,
/// release (1: the holder lets go). Writes only if (epoch, holder) still
/// hold; answers 1 if written, 0 if fenced.
pub static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.call('HMGET', KEYS[1], 'epoch', 'holder')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'answers', ARGV[4])
if ARGV[6] == '1' then redis.call('HSET', KEYS[1], 'holder', '') end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
",
    )
});

/// KEYS: the session. ARGV: epoch, holder, TTL in ms. Moves the idle expiry
/// on if (epoch, holder) still hold; 1 or 0 as [`WRITE`].
pub static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.call('HMGET', KEYS[1], 'epoch', 'holder')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// KEYS: the session. ARGV: epoch, holder. Deletes it if (epoch, holder)
/// still hold; 1 or 0 as [`WRITE`].
pub static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.call('HMGET', KEYS[1], 'epoch', 'holder')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
",
    )
});

/// KEYS: the session. ARGV: the epoch read, the taker. If the epoch is still
/// the one read, increments it and makes the taker the holder; answers
/// {new epoch, owner, id, idle, state, answers}, or an empty list if another
/// replica got there first (or the session is gone).
pub static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch ~= ARGV[1] then return {} end
local next = tostring(tonumber(epoch) + 1)
redis.call('HSET', KEYS[1], 'epoch', next, 'holder', ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'owner', 'id', 'idle', 'state', 'answers')
return {next, f[1], f[2], f[3], f[4], f[5]}
",
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hash_tag_the_owner_and_id() {
        assert_eq!(
            session_key(&Principal::named("a}{b"), "s1"),
            "layerd:session:{617d7b62:s1}"
        );
        assert_eq!(
            session_key(&Principal::default(), "s1"),
            "layerd:session:{:s1}"
        );
    }
}
