//! Session and layer ids: what a client may send, and the random ids the
//! server picks for clients that send none.

use crate::error::Error;

/// Session and layer ids: 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn check_id(field: &str, id: &str) -> Result<(), Error> {
    let valid = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        return Ok(());
    }
    let got = if id.len() > 140 {
        format!("{} characters", id.chars().count())
    } else {
        format!("{id:?}")
    };
    Err(Error::invalid(
        field,
        "1 to 128 characters of [A-Za-z0-9._:-]",
        got,
        "INVALID_ID",
    ))
}

/// 128 bits from the operating system's CSPRNG, as 32 hex digits.
pub(super) fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
