//! The store's keys and the Lua scripts that change them atomically.
//!
//! A session has three keys (four while it is released), all hash-tagged `{<owner in hex>:<id>}` (a
//! Redis Cluster hash tag: one slot for all of them):
//! - `layerd:session:{…}`, a hash: `epoch` (a decimal count of take-overs),
//!   `holder` (the holding replica's id, `""` once released), `owner`, `id`
//!   and `idle` (seconds);
//! - `layerd:state:{…}`: the session's checkpoint, a plain string;
//! - `layerd:answers:{…}`: the last numbered step of each optimizer;
//! - `layerd:kept:{…}`: what its layers kept for Backward, written only by a
//!   holder letting go (a handover, the drain) and taken with the session by
//!   the next holder, so it never outlives the state it was kept with.
//!
//! All of them expire after the session's idle timeout. A write sends the new
//! checkpoint with a plain SET to a staging key of the writer
//! (`layerd:staging:{…}:<replica>`) and, in the same pipeline, [`COMMIT`]
//! renames it over the state if the writer still holds the session: the
//! bytes move once, outside Lua. A replica's heartbeat is
//! `layerd:replica:<id>`, with a short TTL; a replica hears handover requests
//! on the channel `layerd:handover:<id>`.
//!
//! Every script that writes is conditional: [`CREATE`] on the session not
//! existing, [`COMMIT`], [`TOUCH`] and [`DELETE`] on the epoch and holder the
//! writer took the session with (fencing), [`TAKE`] on the epoch the taker
//! read.

use std::sync::LazyLock;

use redis::Script;

use crate::auth::Principal;

/// A session's keys.
pub struct Keys {
    /// The hash of who holds it.
    pub session: String,
    pub state: String,
    pub answers: String,
    pub kept: String,
    tag: String,
}

impl Keys {
    pub fn of(owner: &Principal, id: &str) -> Keys {
        let tag = tag(owner, id);
        Keys {
            session: format!("layerd:session:{tag}"),
            state: format!("layerd:state:{tag}"),
            answers: format!("layerd:answers:{tag}"),
            kept: format!("layerd:kept:{tag}"),
            tag,
        }
    }

    /// The key `replica` stages a new state under before [`COMMIT`].
    pub fn staging(&self, replica: &str) -> String {
        format!("layerd:staging:{}:{replica}", self.tag)
    }
}

/// The hash tag of `owner`'s session `id`: `{<owner in hex>:<id>}`.
fn tag(owner: &Principal, id: &str) -> String {
    use std::fmt::Write;
    let name = owner.name();
    let mut tag = String::with_capacity(name.len() * 2 + id.len() + 3);
    tag.push('{');
    for byte in name.bytes() {
        let _ = write!(tag, "{byte:02x}");
    }
    tag.push(':');
    tag.push_str(id);
    tag.push('}');
    tag
}

/// The key of `owner`'s session `id`'s hash ([`Keys::session`]), alone.
pub fn session_key(owner: &Principal, id: &str) -> String {
    format!("layerd:session:{}", tag(owner, id))
}

/// A replica's heartbeat.
pub fn heartbeat_key(replica: &str) -> String {
    format!("layerd:replica:{replica}")
}

/// The channel a replica hears handover requests on.
pub fn handover_channel(replica: &str) -> String {
    format!("layerd:handover:{replica}")
}

/// KEYS: session, state, answers. ARGV: holder, owner, id, idle seconds,
/// state, TTL in ms. Creates the session at epoch 1 held by ARGV[1]; 0 if it
/// exists.
pub static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'epoch', '1', 'holder', ARGV[1], 'owner', ARGV[2], 'id', ARGV[3],
           'idle', ARGV[4])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6])
redis.call('SET', KEYS[3], '', 'PX', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
",
    )
});

/// How long a staged state waits for its [`COMMIT`] (a write takes
/// milliseconds; a replica that died between the two leaves it to expire).
pub const STAGING_TTL_MS: u64 = 10_000;

/// KEYS: session, state, answers, staging, kept. ARGV: epoch, holder,
/// answers, TTL in ms, release (1: the holder lets go), kept (with release).
/// If (epoch, holder) still hold, moves the staged state over the state and
/// answers 1; else drops the staged state and answers 0 (fenced); -1 if the
/// staged state is gone (expired before its commit: nothing written).
pub static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.call('HMGET', KEYS[1], 'epoch', 'holder')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  redis.call('DEL', KEYS[4])
  return 0
end
if redis.call('EXISTS', KEYS[4]) == 0 then return -1 end
redis.call('RENAME', KEYS[4], KEYS[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'holder', '')
  if ARGV[6] ~= '' then redis.call('SET', KEYS[5], ARGV[6], 'PX', ARGV[4]) end
else
  redis.call('DEL', KEYS[5])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
",
    )
});

/// KEYS: session, state, answers. ARGV: epoch, holder, TTL in ms. Moves the
/// idle expiry on if (epoch, holder) still hold; 1 or 0 as [`COMMIT`].
pub static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.call('HMGET', KEYS[1], 'epoch', 'holder')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then return 0 end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return 1
",
    )
});

/// KEYS: session, state, answers, kept. ARGV: epoch, holder. Deletes the
/// session if (epoch, holder) still hold; 1 or 0 as [`COMMIT`].
pub static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.call('HMGET', KEYS[1], 'epoch', 'holder')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 1
",
    )
});

/// KEYS: session, state, answers, kept. ARGV: the epoch read, the taker. If
/// the epoch is still the one read, increments it, makes the taker the
/// holder and takes the kept state (deleting it); answers {new epoch, owner,
/// id, idle, state, answers, kept} (a missing value as an empty string), or
/// an empty list if another replica got there first (or the session is
/// gone).
pub static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch ~= ARGV[1] then return {} end
local next = tostring(tonumber(epoch) + 1)
redis.call('HSET', KEYS[1], 'epoch', next, 'holder', ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'owner', 'id', 'idle')
local state = redis.call('GET', KEYS[2])
local answers = redis.call('GET', KEYS[3])
local kept = redis.call('GET', KEYS[4])
redis.call('DEL', KEYS[4])
return {next, f[1] or '', f[2] or '', f[3] or '', state or '', answers or '', kept or ''}
",
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag_of_owner_and_id() {
        let keys = Keys::of(&Principal::named("a}{b"), "s1");
        assert_eq!(keys.session, "layerd:session:{617d7b62:s1}");
        assert_eq!(keys.state, "layerd:state:{617d7b62:s1}");
        assert_eq!(keys.answers, "layerd:answers:{617d7b62:s1}");
        assert_eq!(keys.kept, "layerd:kept:{617d7b62:s1}");
        assert_eq!(keys.staging("r0"), "layerd:staging:{617d7b62:s1}:r0");
        assert_eq!(
            Keys::of(&Principal::default(), "s1").session,
            "layerd:session:{:s1}"
        );
    }
}
