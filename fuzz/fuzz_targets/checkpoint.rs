//! Fuzzes ImportSession's file: arbitrary bytes through the checkpoint
//! parser, and what parses, restored into a session and exported again.
//! The same bytes go through the session store's other values: the last
//! numbered answers (`durable::answers::decode`), which must refuse them or
//! decode them without panicking; and the kept state of a handover
//! (`durable::kept`), as they are and spliced into a valid value (every
//! kind's kept state, see `kept.rs`), which must be refused or restored into
//! a session whose every Backward then runs without panicking.
//!
//! Invariants: nothing panics; every refusal is INVALID_ARGUMENT (a bad file
//! is the client's error); a file that parses restores within generous
//! budgets or answers RESOURCE_EXHAUSTED, and the restored session exports a
//! file that parses again and restores to the same export.
#![no_main]

use layerd::auth::Principal;
use layerd::checkpoint::{export, parse, restore};
use layerd::error::Error;
use layerd::session::Store;
use libfuzzer_sys::fuzz_target;

#[path = "kept.rs"]
mod kept;

fuzz_target!(|data: &[u8]| {
    let _ = layerd::durable::answers::decode(data);
    kept::run(data);
    let checkpoint = match parse(data) {
        Ok(checkpoint) => checkpoint,
        Err(error) => {
            // INVALID_ARGUMENT: the one variant that maps to it.
            assert!(matches!(error, Error::InvalidArgument { .. }), "{error}");
            return;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let guard = Store::start(kept::limits());
        let store = guard.store();
        let owner = Principal::default();
        let (id, _) = store.create(&owner, "a", 0).unwrap();
        let session = store.session(&owner, &id).unwrap();
        if let Err(error) = restore(&session, checkpoint).await {
            // RESOURCE_EXHAUSTED: the one variant that maps to it.
            assert!(matches!(error, Error::LimitExceeded { .. }), "{error}");
            return;
        }
        let file = export(&session).await.unwrap();
        let again = parse(&file).expect("an exported file parses");
        let (id, _) = store.create(&owner, "b", 0).unwrap();
        let copy = store.session(&owner, &id).unwrap();
        restore(&copy, again).await.expect("it fitted once");
        assert_eq!(
            export(&copy).await.unwrap(),
            file,
            "export ∘ import is the identity"
        );
    });
});
