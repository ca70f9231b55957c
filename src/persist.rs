//! `--state-dir`: sessions that hold parameters survive a restart. The drain
//! writes each to the directory (and `--snapshot-interval` does so
//! periodically), and the next start imports them, keeping their ids,
//! owners, idle timeouts and the idle time they had left.
//!
//! A file is a checkpoint ([`crate::checkpoint`]) with one more metadata
//! entry, `layerd.session`: the session's id, owner, idle timeout and
//! remaining idle time. Files are named `session-<owner in hex>-<id>.safetensors`
//! and written atomically (a temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves the old file or the new one, never half of
//! one. A snapshot also removes the files of sessions that ended since.
//! At start, a file that is corrupt, foreign or does not fit is logged and
//! skipped, never fatal.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::checkpoint;
use crate::session::Store;

/// The metadata entry naming the session a file holds.
const SESSION_KEY: &str = "layerd.session";
const PREFIX: &str = "session-";
const SUFFIX: &str = ".safetensors";

/// Who a saved session belongs to and how long it may stay idle.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedSession {
    id: String,
    owner: String,
    idle_timeout_seconds: u32,
    remaining_ms: u64,
}

/// Writes every live session that holds parameters to `dir` and removes the
/// files of sessions no longer live. Returns how many it wrote.
pub async fn save(store: &Store, dir: &Path) -> std::io::Result<usize> {
    let mut written = HashSet::new();
    for (owner, session, remaining) in store.live_sessions() {
        let holds_params = session
            .layers_by_id()
            .iter()
            .any(|(_, layer)| layer.chain.has_params());
        if !holds_params {
            continue;
        }
        let saved = SavedSession {
            id: session.id().to_string(),
            owner: owner.name().to_string(),
            idle_timeout_seconds: session
                .idle_timeout()
                .as_secs()
                .try_into()
                .unwrap_or(u32::MAX),
            remaining_ms: remaining.as_millis().try_into().unwrap_or(u64::MAX),
        };
        let extra = HashMap::from([(
            SESSION_KEY.to_string(),
            serde_json::to_string(&saved).expect("plain data serialises"),
        )]);
        let file = match checkpoint::export_with(&session, extra).await {
            Ok(file) => file,
            Err(error) => {
                tracing::error!(session = %saved.id, %error, "cannot snapshot the session");
                continue;
            }
        };
        let name = file_name(&owner, session.id());
        write_atomically(dir, &name, &file)?;
        written.insert(name);
    }
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && name.ends_with(SUFFIX) && !written.contains(&name) {
            fs::remove_file(dir.join(&name))?;
        }
    }
    Ok(written.len())
}

/// Imports every session file in `dir` into `store`; logs and skips those
/// that cannot be. Returns how many it restored.
pub async fn load(store: &Store, dir: &Path) -> std::io::Result<usize> {
    let mut restored = 0;
    let mut names: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for path in names {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !(name.starts_with(PREFIX) && name.ends_with(SUFFIX)) {
            tracing::warn!(file = %path.display(), "not a session file of layerd: skipped");
            continue;
        }
        match load_one(store, &path).await {
            Ok(id) => {
                tracing::info!(file = %path.display(), session = %id, "session restored");
                restored += 1;
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "session file skipped");
            }
        }
    }
    Ok(restored)
}

async fn load_one(store: &Store, path: &Path) -> Result<String, String> {
    let file = fs::read(path).map_err(|e| e.to_string())?;
    let saved = checkpoint::metadata_entry(&file, SESSION_KEY)
        .ok_or_else(|| format!("no {SESSION_KEY} metadata: not a session file"))?;
    let saved: SavedSession =
        serde_json::from_str(&saved).map_err(|e| format!("{SESSION_KEY}: {e}"))?;
    let parsed = checkpoint::parse(&file).map_err(|e| e.to_string())?;
    let owner = Principal::named(&saved.owner);
    let remaining = Duration::from_millis(saved.remaining_ms);
    let session = store
        .reopen(&owner, &saved.id, saved.idle_timeout_seconds, remaining)
        .map_err(|e| e.to_string())?;
    checkpoint::restore_new(store, &owner, &session, parsed)
        .await
        .map_err(|e| e.to_string())?;
    Ok(session.id().to_string())
}

/// `session-<owner in hex>-<id>.safetensors`: ids are safe in file names,
/// owners (token principals) need not be.
fn file_name(owner: &Principal, id: &str) -> String {
    let owner: String = owner.name().bytes().map(|b| format!("{b:02x}")).collect();
    format!("{PREFIX}{owner}-{id}{SUFFIX}")
}

/// Writes `name` in `dir` so that a crash leaves the old file or the new.
fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let temporary = dir.join(format!(".{name}.tmp"));
    let mut file = fs::File::create(&temporary)?;
    file.write_all(data)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe_and_distinct_per_owner() {
        let anonymous = file_name(&Principal::default(), "s1");
        assert_eq!(anonymous, "session--s1.safetensors");
        let alice = file_name(&Principal::named("alice/../x"), "s1");
        assert_eq!(alice, "session-616c6963652f2e2e2f78-s1.safetensors");
        assert!(!alice.contains('/'));
    }
}
