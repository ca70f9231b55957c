//! Triton's system shared-memory extension: a client registers a POSIX
//! shared-memory object (a file under `/dev/shm`) as a named region, and a
//! ModelInfer input or output names a region, an offset and a byte size
//! (parameters `shared_memory_region`, `shared_memory_offset`,
//! `shared_memory_byte_size`) instead of carrying its bytes.
//!
//! Invariants:
//! - Off unless `--allow-client-shm`: every call then answers
//!   FAILED_PRECONDITION `SHARED_MEMORY_DISABLED` and opens nothing.
//! - Only objects directly under `/dev/shm` are opened (the key is one path
//!   component, symlinks are not followed, the object must be a regular
//!   file), and a region's `offset + byte_size` lies inside the object when
//!   it is registered; each use's `offset + byte_size` lies inside its region.
//! - Regions are never mapped. The server keeps the object's descriptor and
//!   reads inputs with `pread`, writes outputs with `pwrite`: an owner that
//!   shrinks or removes the object cannot crash the server (a mapping would
//!   raise SIGBUS on pages past the new end). A short read, or an object now
//!   too small for an output, answers FAILED_PRECONDITION `REGION_UNUSABLE`;
//!   the server never grows an object.
//! - Names are per principal (each caller has its own namespace when
//!   authentication is on); `--max-shm-regions` bounds the registered regions
//!   of all callers together.
//! - Unregister removes the name at once (later requests get
//!   `REGION_NOT_FOUND`), then waits until the requests that already hold
//!   the region have finished with it: after it answers, the server no
//!   longer touches the object.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use super::sequence::describe;
use crate::auth::Principal;
use crate::error::Error;
use crate::pb::inference::{
    infer_parameter::ParameterChoice, system_shared_memory_status_response::RegionStatus,
    InferParameter,
};
use crate::rpc::status::CallError;

/// Where POSIX shared-memory objects live; keys name files here.
pub const SHM_DIR: &str = "/dev/shm";

/// A request's reference to part of a region, as its parameters give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmRef {
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

impl ShmRef {
    /// The shared-memory parameters of the tensor named `field` (`inputs[0]`,
    /// `outputs[0]`), if it names a region. As in Triton, the offset is
    /// optional (0) and the byte size is required with a region; neither may
    /// come without one.
    pub fn parse(
        parameters: &HashMap<String, InferParameter>,
        field: &str,
    ) -> Result<Option<ShmRef>, Error> {
        let get = |name: &str| {
            parameters
                .get(name)
                .and_then(|p| p.parameter_choice.as_ref())
        };
        let param_field = |name: &str| format!("{field}.parameters.{name}");
        let size = |name: &str| -> Result<Option<u64>, Error> {
            match get(name) {
                None => Ok(None),
                Some(ParameterChoice::Int64Param(n)) if *n >= 0 => Ok(Some(*n as u64)),
                Some(ParameterChoice::Uint64Param(n)) => Ok(Some(*n)),
                Some(other) => Err(Error::invalid(
                    param_field(name),
                    "an int64_param ≥ 0",
                    describe(other),
                    "INVALID_PARAMETER",
                )),
            }
        };
        let offset = size("shared_memory_offset")?;
        let byte_size = size("shared_memory_byte_size")?;
        let region = match get("shared_memory_region") {
            None => {
                if let Some(name) = [
                    ("shared_memory_offset", offset),
                    ("shared_memory_byte_size", byte_size),
                ]
                .iter()
                .find_map(|(name, value)| value.map(|_| *name))
                {
                    return Err(Error::invalid(
                        param_field(name),
                        "shared_memory_region alongside it",
                        "no shared_memory_region",
                        "INVALID_PARAMETER",
                    ));
                }
                return Ok(None);
            }
            Some(ParameterChoice::StringParam(name)) if !name.is_empty() => name.clone(),
            Some(other) => {
                return Err(Error::invalid(
                    param_field("shared_memory_region"),
                    "a non-empty string_param (a registered region's name)",
                    describe(other),
                    "INVALID_PARAMETER",
                ))
            }
        };
        let byte_size = byte_size.ok_or_else(|| {
            Error::invalid(
                param_field("shared_memory_byte_size"),
                "the byte size of the tensor in the region, with shared_memory_region",
                "none",
                "INVALID_PARAMETER",
            )
        })?;
        Ok(Some(ShmRef {
            region,
            offset: offset.unwrap_or(0),
            byte_size,
        }))
    }
}

/// One registered region.
struct Region {
    name: String,
    key: String,
    offset: u64,
    byte_size: u64,
    file: File,
    /// Held shared by each request that uses the region, exclusively by
    /// Unregister until those have finished.
    uses: Arc<RwLock<()>>,
}

impl Region {
    fn status(&self) -> RegionStatus {
        RegionStatus {
            name: self.name.clone(),
            key: self.key.clone(),
            offset: self.offset,
            byte_size: self.byte_size,
        }
    }

    fn unusable(&self, detail: impl Into<String>) -> CallError {
        CallError::RegionUnusable {
            region: self.name.clone(),
            detail: detail.into(),
        }
    }
}

/// The registered regions of every caller; cheap to share behind an `Arc`.
pub struct Regions {
    enabled: bool,
    max_regions: usize,
    /// The most bytes one use may read or write (`--max-work-bytes`): a
    /// region can be far larger than the memory a call may build.
    max_use_bytes: u64,
    by_owner: Mutex<HashMap<Principal, HashMap<String, Arc<Region>>>>,
}

/// A request's hold on part of a region: the region stays registered-or-
/// waited-for until this is dropped.
pub struct RegionUse {
    region: Arc<Region>,
    /// Where the use starts in the object, and its length.
    start: u64,
    len: u64,
    _held: OwnedRwLockReadGuard<()>,
}

impl RegionUse {
    /// The byte size the request gave for this use.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The use's bytes, read from the object (blocking: large reads belong
    /// off the async workers).
    pub fn read(&self) -> Result<Bytes, CallError> {
        self.read_range(0, self.len as usize)
    }

    /// `len` of the use's bytes from `from` on (both within the use).
    pub fn read_range(&self, from: u64, len: usize) -> Result<Bytes, CallError> {
        self.check_range(from, len)?;
        let mut data = vec![0u8; len];
        let start = self.start + from;
        match self.region.file.read_exact_at(&mut data, start) {
            Ok(()) => Ok(Bytes::from(data)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.region.unusable(format!(
                    "its object {:?} now ends before byte {} (shrunk since it was registered)",
                    self.region.key,
                    start + len as u64
                )))
            }
            Err(e) => Err(self
                .region
                .unusable(format!("reading {:?}: {e}", self.region.key))),
        }
    }

    /// Writes `data` (at most the use's length) at the use's start, unless
    /// the object has shrunk below it (blocking, as [`RegionUse::read`]).
    pub fn write(&self, data: &[u8]) -> Result<(), CallError> {
        self.write_at(0, data)
    }

    /// Writes `data` at `from` within the use, as [`RegionUse::write`].
    pub fn write_at(&self, from: u64, data: &[u8]) -> Result<(), CallError> {
        self.check_range(from, data.len())?;
        let start = self.start + from;
        let end = start + data.len() as u64;
        let size = self
            .region
            .file
            .metadata()
            .map_err(|e| self.region.unusable(format!("{:?}: {e}", self.region.key)))?
            .len();
        if size < end {
            return Err(self.region.unusable(format!(
                "its object {:?} is now {size} bytes, shorter than the output's end at byte {end}",
                self.region.key
            )));
        }
        self.region.file.write_all_at(data, start).map_err(|e| {
            self.region
                .unusable(format!("writing {:?}: {e}", self.region.key))
        })
    }
}

impl RegionUse {
    /// A range the server itself asks for: outside the use is a bug.
    fn check_range(&self, from: u64, len: usize) -> Result<(), CallError> {
        match from.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CallError::internal(format!(
                "bytes {from}..+{len} of a {}-byte use of region {:?}",
                self.len, self.region.name
            ))),
        }
    }
}

impl Regions {
    pub fn new(enabled: bool, max_regions: usize, max_use_bytes: u64) -> Regions {
        Regions {
            enabled,
            max_regions,
            max_use_bytes,
            by_owner: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn check_enabled(&self) -> Result<(), CallError> {
        match self.enabled {
            true => Ok(()),
            false => Err(CallError::SharedMemoryDisabled),
        }
    }

    /// Registers `name` for `owner`: opens `/dev/shm/<key>` read-write and
    /// checks that `offset + byte_size` lies inside it.
    pub fn register(
        &self,
        owner: &Principal,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), CallError> {
        self.check_enabled()?;
        if name.is_empty() {
            return Err(CallError::invalid(
                "name",
                "a non-empty region name",
                "\"\"",
                "INVALID_REGION",
            ));
        }
        let file_name = object_name(key)?;
        if byte_size == 0 {
            return Err(CallError::invalid(
                "byte_size",
                "at least 1 byte",
                "0",
                "INVALID_REGION",
            ));
        }
        let end = offset.checked_add(byte_size).ok_or_else(|| {
            CallError::invalid(
                "byte_size",
                "offset + byte_size within 2^64",
                format!("offset {offset} + byte_size {byte_size}"),
                "OUT_OF_BOUNDS",
            )
        })?;
        // Cheap checks first: no file is opened for a name that cannot be added.
        self.check_room(owner, name)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(Path::new(SHM_DIR).join(file_name))
            .map_err(|e| {
                CallError::invalid(
                    "key",
                    format!("an existing shared-memory object under {SHM_DIR} that the server may read and write"),
                    format!("{key:?}: {e}"),
                    "INVALID_REGION",
                )
            })?;
        let metadata = file
            .metadata()
            .map_err(|e| Error::Internal(e.to_string()))?;
        if !metadata.is_file() {
            return Err(CallError::invalid(
                "key",
                "a shared-memory object (a regular file)",
                format!("{key:?}, which is not"),
                "INVALID_REGION",
            ));
        }
        if metadata.len() < end {
            return Err(CallError::invalid(
                "byte_size",
                format!(
                    "offset + byte_size ≤ the size of {key:?} ({} bytes)",
                    metadata.len()
                ),
                format!("offset {offset} + byte_size {byte_size} = {end}"),
                "OUT_OF_BOUNDS",
            ));
        }
        let region = Arc::new(Region {
            name: name.to_string(),
            key: key.to_string(),
            offset,
            byte_size,
            file,
            uses: Arc::new(RwLock::new(())),
        });
        // Checked again: another Register may have come in meanwhile.
        let mut by_owner = self.lock();
        self.check_room_in(&by_owner, owner, name)?;
        by_owner
            .entry(owner.clone())
            .or_default()
            .insert(name.to_string(), region);
        crate::metrics::shm_regions(count(&by_owner));
        Ok(())
    }

    fn check_room(&self, owner: &Principal, name: &str) -> Result<(), CallError> {
        self.check_room_in(&self.lock(), owner, name)
    }

    fn check_room_in(
        &self,
        by_owner: &HashMap<Principal, HashMap<String, Arc<Region>>>,
        owner: &Principal,
        name: &str,
    ) -> Result<(), CallError> {
        if by_owner.get(owner).is_some_and(|r| r.contains_key(name)) {
            return Err(CallError::RegionExists {
                region: name.to_string(),
            });
        }
        let registered = count(by_owner);
        if registered >= self.max_regions {
            return Err(CallError::from(Error::LimitExceeded {
                flag: "--max-shm-regions",
                limit: self.max_regions.to_string(),
                detail: format!("{registered} regions are registered"),
            }));
        }
        Ok(())
    }

    /// The status of `owner`'s regions, or of the one named.
    pub fn status(
        &self,
        owner: &Principal,
        name: &str,
    ) -> Result<HashMap<String, RegionStatus>, CallError> {
        self.check_enabled()?;
        let by_owner = self.lock();
        let regions = by_owner.get(owner);
        if name.is_empty() {
            let all = regions.into_iter().flat_map(|r| r.values());
            return Ok(all.map(|r| (r.name.clone(), r.status())).collect());
        }
        match regions.and_then(|r| r.get(name)) {
            Some(region) => Ok(HashMap::from([(name.to_string(), region.status())])),
            None => Err(not_found(name, "name")),
        }
    }

    /// Unregisters `owner`'s region `name` (all of them for ""), then waits
    /// for the requests still using them.
    pub async fn unregister(&self, owner: &Principal, name: &str) -> Result<(), CallError> {
        self.check_enabled()?;
        let removed: Vec<Arc<Region>> = {
            let mut by_owner = self.lock();
            let removed = match by_owner.get_mut(owner) {
                Some(regions) if name.is_empty() => regions.drain().map(|(_, r)| r).collect(),
                Some(regions) => regions.remove(name).into_iter().collect(),
                None => Vec::new(),
            };
            if by_owner.get(owner).is_some_and(|r| r.is_empty()) {
                by_owner.remove(owner);
            }
            crate::metrics::shm_regions(count(&by_owner));
            removed
        };
        if removed.is_empty() && !name.is_empty() {
            return Err(not_found(name, "name"));
        }
        for region in removed {
            let _ = region.uses.write().await;
        }
        Ok(())
    }

    /// A hold on the part of `owner`'s region that `reference` names (for
    /// the tensor `field`), its bounds checked.
    pub fn hold(
        &self,
        owner: &Principal,
        reference: &ShmRef,
        field: &str,
    ) -> Result<RegionUse, CallError> {
        self.check_enabled()?;
        let region_field = format!("{field}.parameters.shared_memory_region");
        let (region, held) = {
            let by_owner = self.lock();
            let region = by_owner
                .get(owner)
                .and_then(|r| r.get(&reference.region))
                .ok_or_else(|| not_found(&reference.region, &region_field))?
                .clone();
            // Unregister takes the lock only after removing the region from
            // this map, so a region found here is never locked exclusively.
            let held = region
                .uses
                .clone()
                .try_read_owned()
                .map_err(|_| not_found(&reference.region, &region_field))?;
            (region, held)
        };
        let end = reference.offset.checked_add(reference.byte_size);
        if end.is_none_or(|end| end > region.byte_size) {
            return Err(CallError::invalid(
                format!("{field}.parameters.shared_memory_byte_size"),
                format!(
                    "shared_memory_offset + shared_memory_byte_size ≤ the {} bytes of region {:?}",
                    region.byte_size, region.name
                ),
                format!(
                    "offset {} + byte_size {}",
                    reference.offset, reference.byte_size
                ),
                "OUT_OF_BOUNDS",
            ));
        }
        if reference.byte_size > self.max_use_bytes {
            return Err(CallError::from(Error::LimitExceeded {
                flag: "--max-work-bytes",
                limit: bytesize::ByteSize(self.max_use_bytes).to_string(),
                detail: format!(
                    "{field} would move {} bytes through region {:?}",
                    reference.byte_size, region.name
                ),
            }));
        }
        Ok(RegionUse {
            start: region.offset + reference.offset,
            len: reference.byte_size,
            region,
            _held: held,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Principal, HashMap<String, Arc<Region>>>> {
        // The map is left consistent at every step, so a poisoned lock is safe to use.
        self.by_owner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn count(by_owner: &HashMap<Principal, HashMap<String, Arc<Region>>>) -> usize {
    by_owner.values().map(HashMap::len).sum()
}

fn not_found(region: &str, field: &str) -> CallError {
    CallError::RegionNotFound {
        region: region.to_string(),
        field: field.to_string(),
    }
}

/// The file name under [`SHM_DIR`] of the object `key` names, as `shm_open`
/// reads it: one leading `/`, then one path component.
fn object_name(key: &str) -> Result<&str, CallError> {
    let name = key.strip_prefix('/').unwrap_or(key);
    let valid = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0']);
    match valid {
        true => Ok(name),
        false => Err(CallError::invalid(
            "key",
            format!("a shared-memory key: \"/name\" (one path component, the file {SHM_DIR}/name)"),
            format!("{key:?}"),
            "INVALID_REGION",
        )),
    }
}

#[cfg(test)]
mod tests;
