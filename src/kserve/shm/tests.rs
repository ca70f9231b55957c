//! Tests of [`super`].

use super::super::sequence::params;
use super::*;

fn field_of(error: Error) -> String {
    match error {
        Error::InvalidArgument { field, .. } => field,
        other => panic!("{other}"),
    }
}

#[test]
fn parameters_follow_tritons_rules() {
    use ParameterChoice::*;
    assert_eq!(ShmRef::parse(&params(&[]), "inputs[0]").unwrap(), None);
    let full = params(&[
        ("shared_memory_region", StringParam("in".into())),
        ("shared_memory_offset", Int64Param(8)),
        ("shared_memory_byte_size", Int64Param(16)),
    ]);
    assert_eq!(
        ShmRef::parse(&full, "inputs[0]").unwrap(),
        Some(ShmRef {
            region: "in".into(),
            offset: 8,
            byte_size: 16
        })
    );
    let no_offset = params(&[
        ("shared_memory_region", StringParam("in".into())),
        ("shared_memory_byte_size", Uint64Param(16)),
    ]);
    assert_eq!(ShmRef::parse(&no_offset, "x").unwrap().unwrap().offset, 0);
    for (p, field) in [
        (
            params(&[("shared_memory_region", StringParam("in".into()))]),
            "inputs[0].parameters.shared_memory_byte_size",
        ),
        (
            params(&[("shared_memory_byte_size", Int64Param(4))]),
            "inputs[0].parameters.shared_memory_byte_size",
        ),
        (
            params(&[("shared_memory_offset", Int64Param(4))]),
            "inputs[0].parameters.shared_memory_offset",
        ),
        (
            params(&[
                ("shared_memory_region", StringParam("in".into())),
                ("shared_memory_byte_size", Int64Param(-4)),
            ]),
            "inputs[0].parameters.shared_memory_byte_size",
        ),
        (
            params(&[
                ("shared_memory_region", Int64Param(1)),
                ("shared_memory_byte_size", Int64Param(4)),
            ]),
            "inputs[0].parameters.shared_memory_region",
        ),
    ] {
        assert_eq!(field_of(ShmRef::parse(&p, "inputs[0]").unwrap_err()), field);
    }
}

#[test]
fn keys_name_one_file_under_dev_shm() {
    assert_eq!(object_name("/input0").unwrap(), "input0");
    assert_eq!(object_name("input0").unwrap(), "input0");
    for bad in ["", "/", "/..", "..", "/a/b", "//a", "a\0b", "/."] {
        assert!(object_name(bad).is_err(), "{bad:?}");
    }
}

/// A shared-memory object for one test, removed on drop.
struct Object(String);

impl Object {
    fn new(tag: &str, size: u64) -> Object {
        let key = format!("/layerd-unit-{}-{tag}", std::process::id());
        let file = File::create(Path::new(SHM_DIR).join(&key[1..])).unwrap();
        file.set_len(size).unwrap();
        Object(key)
    }

    fn path(&self) -> std::path::PathBuf {
        Path::new(SHM_DIR).join(&self.0[1..])
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path());
    }
}

fn reference(region: &str, offset: u64, byte_size: u64) -> ShmRef {
    ShmRef {
        region: region.into(),
        offset,
        byte_size,
    }
}

#[test]
fn disabled_regions_refuse_everything() {
    let regions = Regions::new(false, 8, 1 << 20);
    let me = Principal::default();
    let object = Object::new("disabled", 64);
    for error in [
        regions.register(&me, "r", &object.0, 0, 64).unwrap_err(),
        regions.status(&me, "").unwrap_err(),
        regions.hold(&me, &reference("r", 0, 4), "x").err().unwrap(),
    ] {
        assert_eq!(error.reason(), "SHARED_MEMORY_DISABLED");
    }
}

#[test]
fn registration_checks_bounds_names_and_the_limit() {
    let regions = Regions::new(true, 2, 1 << 20);
    let (me, other) = (Principal::default(), Principal::named("other"));
    let object = Object::new("bounds", 64);
    let reason = |r: Result<(), CallError>| r.unwrap_err().reason();
    assert_eq!(
        reason(regions.register(&me, "r", &object.0, 32, 33)),
        "OUT_OF_BOUNDS"
    );
    assert_eq!(
        reason(regions.register(&me, "r", &object.0, u64::MAX, 2)),
        "OUT_OF_BOUNDS"
    );
    assert_eq!(
        reason(regions.register(&me, "r", "/no-such-object-here", 0, 1)),
        "INVALID_REGION"
    );
    assert_eq!(
        reason(regions.register(&me, "r", "/../etc/passwd", 0, 1)),
        "INVALID_REGION"
    );
    regions.register(&me, "r", &object.0, 32, 32).unwrap();
    assert_eq!(
        reason(regions.register(&me, "r", &object.0, 0, 8)),
        "REGION_EXISTS"
    );
    // Names are per principal.
    regions.register(&other, "r", &object.0, 0, 8).unwrap();
    assert_eq!(
        reason(regions.register(&me, "s", &object.0, 0, 8)),
        "LIMIT_EXCEEDED"
    );
    assert_eq!(regions.status(&me, "").unwrap()["r"].offset, 32);
    assert_eq!(regions.status(&other, "r").unwrap()["r"].byte_size, 8);
    assert_eq!(
        regions.status(&me, "s").unwrap_err().reason(),
        "REGION_NOT_FOUND"
    );
}

#[test]
fn uses_are_bounded_and_survive_a_shrinking_object() {
    let regions = Regions::new(true, 8, 1 << 20);
    let me = Principal::default();
    let object = Object::new("shrink", 64);
    std::fs::write(object.path(), (0..64u8).collect::<Vec<_>>()).unwrap();
    regions.register(&me, "r", &object.0, 16, 32).unwrap();
    let hold = |offset, size| regions.hold(&me, &reference("r", offset, size), "inputs[0]");
    assert_eq!(hold(0, 33).err().unwrap().reason(), "OUT_OF_BOUNDS");
    assert_eq!(hold(u64::MAX, 2).err().unwrap().reason(), "OUT_OF_BOUNDS");
    let held = hold(4, 8).unwrap();
    assert_eq!(
        &held.read().unwrap()[..],
        &(20..28u8).collect::<Vec<_>>()[..]
    );
    held.write(&[7; 8]).unwrap();
    assert_eq!(&std::fs::read(object.path()).unwrap()[20..28], &[7; 8]);
    // The owner truncates the object under the region: errors, no crash,
    // and the server does not grow it back.
    File::options()
        .write(true)
        .open(object.path())
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(held.read().unwrap_err().reason(), "REGION_UNUSABLE");
    assert_eq!(held.write(&[1; 8]).unwrap_err().reason(), "REGION_UNUSABLE");
    assert_eq!(std::fs::metadata(object.path()).unwrap().len(), 10);
    // Removed altogether: the descriptor still reads the (now short) object.
    std::fs::remove_file(object.path()).unwrap();
    assert_eq!(held.read().unwrap_err().reason(), "REGION_UNUSABLE");
}

#[tokio::test]
async fn unregister_waits_for_the_uses_in_flight() {
    let regions = Arc::new(Regions::new(true, 8, 1 << 20));
    let me = Principal::default();
    let object = Object::new("unregister", 64);
    regions.register(&me, "r", &object.0, 0, 64).unwrap();
    let held = regions.hold(&me, &reference("r", 0, 8), "x").unwrap();
    let unregistering = tokio::spawn({
        let (regions, me) = (regions.clone(), me.clone());
        async move { regions.unregister(&me, "r").await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // Gone for new requests at once, but not finished while `held` lives.
    assert_eq!(
        regions
            .hold(&me, &reference("r", 0, 8), "x")
            .err()
            .unwrap()
            .reason(),
        "REGION_NOT_FOUND"
    );
    assert!(!unregistering.is_finished());
    held.write(&[1; 8]).unwrap();
    drop(held);
    unregistering.await.unwrap().unwrap();
    assert_eq!(
        regions.unregister(&me, "r").await.unwrap_err().reason(),
        "REGION_NOT_FOUND"
    );
    regions.unregister(&me, "").await.unwrap();
}
