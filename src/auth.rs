//! Bearer-token authentication and the principal that owns each session.
//!
//! With `--auth-tokens FILE`, every call to the layer and KServe services must
//! carry `authorization: Bearer <token>` naming a token of the file; the
//! interceptor puts the token's [`Principal`] into the request's extensions,
//! and the session store keeps one id space per principal, so another
//! principal's sessions answer NOT_FOUND exactly like ones that never existed.
//! Without the flag every caller is the anonymous principal. grpc.health and
//! reflection stay open (Kubernetes probes carry no token).
//!
//! The file holds one `TOKEN PRINCIPAL` pair per line; blank lines and lines
//! starting with `#` are skipped. It is read once at start.

use std::{collections::HashMap, path::Path, sync::Arc};

use tonic::{metadata::MetadataMap, service::Interceptor, Request, Status};

use crate::rpc::status::CallError;

/// Shortest token accepted: 16 characters (at least 96 bits if random base64).
const MIN_TOKEN_CHARS: usize = 16;

/// Who makes a call: the principal its token maps to, or the anonymous one
/// when authentication is off. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Principal(Arc<str>);

impl Principal {
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The principal of that name (one read back from `--state-dir`; "" is
    /// the anonymous principal of a server without `--auth-tokens`).
    pub fn named(name: &str) -> Principal {
        Principal(name.into())
    }

    /// The principal stored with the request by [`Authenticator`]; a request
    /// that did not pass through it is refused (fail closed).
    pub fn of(extensions: &http::Extensions) -> Result<Principal, CallError> {
        extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| CallError::Unauthenticated {
                reason: "MISSING_TOKEN",
                detail: "the request was not authenticated".into(),
            })
    }
}

/// A call's principal together with the metadata it sent (for the routing
/// header): what a handler needs of a request besides its message.
pub struct Caller {
    pub principal: Principal,
    pub metadata: MetadataMap,
}

impl Caller {
    pub fn from_parts(
        metadata: MetadataMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, CallError> {
        Ok(Caller {
            principal: Principal::of(extensions)?,
            metadata,
        })
    }
}

/// The interceptor in front of the layer and KServe services.
#[derive(Clone, Default)]
pub struct Authenticator {
    /// `None`: authentication off, every caller anonymous.
    tokens: Option<Arc<HashMap<String, Principal>>>,
}

impl Authenticator {
    /// Every caller is the anonymous principal.
    pub fn open() -> Authenticator {
        Authenticator::default()
    }

    /// Reads a token file (see the module docs).
    pub fn from_file(path: &Path) -> Result<Authenticator, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--auth-tokens {}: {e}", path.display()))?;
        Authenticator::parse(&text).map_err(|e| format!("--auth-tokens {}: {e}", path.display()))
    }

    /// Parses `TOKEN PRINCIPAL` lines.
    pub fn parse(text: &str) -> Result<Authenticator, String> {
        let mut tokens = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("line {}", index + 1);
            let mut words = line.split_whitespace();
            let (Some(token), Some(principal), None) = (words.next(), words.next(), words.next())
            else {
                return Err(format!(
                    "{}: expected `TOKEN PRINCIPAL`, got {} words",
                    at(),
                    line.split_whitespace().count()
                ));
            };
            if token.len() < MIN_TOKEN_CHARS || !token.bytes().all(is_token_byte) {
                return Err(format!(
                    "{}: a token must be at least {MIN_TOKEN_CHARS} characters of \
                     [A-Za-z0-9-._~+/=]",
                    at()
                ));
            }
            let principal_ok = (1..=64).contains(&principal.len())
                && principal
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-@:".contains(&b));
            if !principal_ok {
                return Err(format!(
                    "{}: a principal must be 1 to 64 characters of [A-Za-z0-9._-@:], got {principal:?}",
                    at()
                ));
            }
            if tokens
                .insert(token.to_string(), Principal(principal.into()))
                .is_some()
            {
                return Err(format!("{}: this token is already listed", at()));
            }
        }
        if tokens.is_empty() {
            return Err("no tokens: every call would be refused".into());
        }
        Ok(Authenticator {
            tokens: Some(Arc::new(tokens)),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.tokens.is_some()
    }

    fn authenticate(&self, metadata: &MetadataMap) -> Result<Principal, CallError> {
        let Some(tokens) = &self.tokens else {
            return Ok(Principal::default());
        };
        let missing = |detail: &str| CallError::Unauthenticated {
            reason: "MISSING_TOKEN",
            detail: format!("expected an `authorization: Bearer <token>` header, got {detail}"),
        };
        let header = metadata
            .get("authorization")
            .ok_or_else(|| missing("none"))?
            .to_str()
            .map_err(|_| missing("a value that is not ASCII"))?;
        let token = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err(missing("another scheme")),
        };
        // The token itself never appears in a status or a log line.
        tokens
            .get(token)
            .cloned()
            .ok_or_else(|| CallError::Unauthenticated {
                reason: "INVALID_TOKEN",
                detail: "the bearer token is not one of --auth-tokens".into(),
            })
    }
}

/// RFC 6750's b64token characters.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let principal = self.authenticate(request.metadata())?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{metadata::MetadataValue, Code};

    const FILE: &str = "# token principal\n\
                        aaaaaaaaaaaaaaaa-alice alice\n\
                        \n\
                        bbbbbbbbbbbbbbbb+bob/= bob@example\n";

    fn call(auth: &Authenticator, header: Option<&str>) -> Result<Principal, Status> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request
                .metadata_mut()
                .insert("authorization", MetadataValue::try_from(value).unwrap());
        }
        let request = auth.clone().call(request)?;
        Ok(Principal::of(request.extensions()).unwrap())
    }

    #[test]
    fn tokens_map_to_their_principals_and_others_are_refused() {
        let auth = Authenticator::parse(FILE).unwrap();
        let alice = call(&auth, Some("Bearer aaaaaaaaaaaaaaaa-alice")).unwrap();
        assert_eq!(alice.name(), "alice");
        let bob = call(&auth, Some("bearer bbbbbbbbbbbbbbbb+bob/=")).unwrap();
        assert_eq!(bob.name(), "bob@example");
        for (header, reason) in [
            (None, "MISSING_TOKEN"),
            (Some("Basic aaaaaaaaaaaaaaaa-alice"), "MISSING_TOKEN"),
            (Some("Bearer aaaaaaaaaaaaaaaa-alicf"), "INVALID_TOKEN"),
            (Some("Bearer alice"), "INVALID_TOKEN"),
        ] {
            let status = call(&auth, header).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{header:?}");
            assert!(!status.message().contains("aaaa"), "token echoed");
            use tonic_types::StatusExt;
            let details = status.get_error_details();
            assert_eq!(details.error_info().unwrap().reason, reason);
        }
    }

    #[test]
    fn without_a_file_everyone_is_anonymous() {
        let principal = call(&Authenticator::open(), None).unwrap();
        assert_eq!(principal, Principal::default());
        assert!(Principal::of(&http::Extensions::new()).is_err());
    }

    #[test]
    fn bad_files_are_refused_with_their_line() {
        for (text, says) in [
            ("", "no tokens"),
            ("short alice", "line 1: a token must be"),
            ("aaaaaaaaaaaaaaaa", "line 1: expected `TOKEN PRINCIPAL`"),
            ("# c\naaaaaaaaaaaaaaaa a b", "line 2: expected"),
            (
                "aaaaaaaaaaaaaaaa a\naaaaaaaaaaaaaaaa b",
                "line 2: this token",
            ),
            ("aaaaaaaaaaaaaaaa a/b", "line 1: a principal"),
            ("aaaaaaaaaaaaaaaa\u{e9} a", "line 1: a token must be"),
        ] {
            let error = Authenticator::parse(text).err().unwrap();
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }
}
