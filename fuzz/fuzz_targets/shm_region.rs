//! Fuzzes the shared-memory regions: registrations and uses with arbitrary
//! offsets and sizes over a real object under /dev/shm, which the input also
//! truncates, grows and removes between uses.
//!
//! Invariants: nothing panics or faults; a hold is granted only inside its
//! region; what a read returns is exactly the object's bytes there; a write
//! lands exactly there and never grows the object; every refusal has one of
//! the expected reasons.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use layerd::auth::Principal;
use layerd::kserve::shm::{Regions, ShmRef, SHM_DIR};
use libfuzzer_sys::fuzz_target;

const REASONS: [&str; 6] = [
    "OUT_OF_BOUNDS",
    "INVALID_REGION",
    "REGION_NOT_FOUND",
    "REGION_EXISTS",
    "REGION_UNUSABLE",
    "LIMIT_EXCEEDED",
];

/// Reads numbers from the fuzzer's bytes, biased towards boundaries.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }

    /// A number near `around` (or anywhere in u64).
    fn near(&mut self, around: u64) -> u64 {
        let delta = u64::from(self.byte() % 9);
        match self.byte() % 6 {
            0 => around.saturating_sub(delta),
            1 => around.saturating_add(delta),
            2 => delta,
            3 => u64::MAX - delta,
            4 => u64::from_le_bytes(std::array::from_fn(|_| self.byte())),
            _ => u64::from(self.byte()) * 16,
        }
    }
}

fn check_refusal(error: layerd::rpc::status::CallError) {
    assert!(REASONS.contains(&error.reason()), "{error}");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let name = format!("layerd-fuzz-{}", std::process::id());
    let path = PathBuf::from(SHM_DIR).join(&name);
    let key = format!("/{name}");
    let size = u64::from(input.byte()) * 8;
    let file = File::create(&path).unwrap();
    file.set_len(size).unwrap();
    file.write_all_at(&(0..size).map(|i| i as u8).collect::<Vec<_>>(), 0)
        .unwrap();
    let regions = Regions::new(true, 2, 1 << 16);
    let owner = Principal::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // The registered region's offset and size, as this target knows them.
    let mut live: Option<(u64, u64)> = None;
    for _ in 0..8 {
        let (offset, byte_size) = (input.near(size), input.near(size));
        match regions.register(&owner, "r", &key, offset, byte_size) {
            Ok(()) => {
                assert!(live.is_none(), "a second region of the same name");
                let object_len = std::fs::metadata(&path).map_or(0, |m| m.len());
                assert!(byte_size > 0 && offset + byte_size <= object_len);
                live = Some((offset, byte_size));
            }
            Err(error) => check_refusal(error),
        }
        for _ in 0..4 {
            match input.byte() % 5 {
                0 => {
                    let len = input.near(size);
                    let _ = File::options()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(len.min(1 << 16)));
                }
                1 => {
                    runtime.block_on(regions.unregister(&owner, "")).unwrap();
                    live = None;
                }
                _ => {
                    let (offset, byte_size) = live.unwrap_or((offset, byte_size));
                    let reference = ShmRef {
                        region: "r".into(),
                        offset: input.near(byte_size),
                        byte_size: input.near(byte_size),
                    };
                    let held = match regions.hold(&owner, &reference, "inputs[0]") {
                        Ok(held) => held,
                        Err(error) => {
                            check_refusal(error);
                            continue;
                        }
                    };
                    assert!(reference.offset + reference.byte_size <= byte_size);
                    let start = offset + reference.offset;
                    let before = std::fs::read(&path).unwrap_or_default();
                    match held.read() {
                        Ok(bytes) => {
                            assert_eq!(bytes.len() as u64, reference.byte_size);
                            if !bytes.is_empty() {
                                let end = start as usize + bytes.len();
                                assert_eq!(Some(&bytes[..]), before.get(start as usize..end));
                            }
                        }
                        Err(error) => check_refusal(error),
                    }
                    let data = vec![input.byte(); held.len() as usize];
                    match held.write(&data) {
                        Ok(()) => {
                            let after = std::fs::read(&path).unwrap();
                            assert_eq!(after.len(), before.len(), "writes never grow the object");
                            if !data.is_empty() {
                                let at = start as usize;
                                assert_eq!(after.get(at..at + data.len()), Some(&data[..]));
                            }
                        }
                        Err(error) => check_refusal(error),
                    }
                }
            }
        }
    }
    let _ = runtime.block_on(regions.unregister(&owner, ""));
    let _ = std::fs::remove_file(&path);
});
