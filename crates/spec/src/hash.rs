//! Revision identity of a service spec.

use crate::service::ServiceSpec;

/// Hash identifying the revision a spec describes: FNV-1a 64 over the spec's JSON, as 16
/// lowercase hex digits. Stable across runs, machines and Rust versions (it depends only on the
/// serialized form). `replicas` and `deploy` are not part of it: scaling, or changing how
/// rollouts run, does not make a new revision.
pub fn spec_hash(spec: &ServiceSpec) -> String {
    let mut normalized = spec.clone();
    normalized.replicas = 1;
    normalized.deploy = crate::deploy::DeploySpec::default();
    // Serializing plain data to a Vec cannot fail; fall back to the Debug form regardless so
    // the function stays total.
    let bytes =
        serde_json::to_vec(&normalized).unwrap_or_else(|_| format!("{normalized:?}").into_bytes());
    format!("{:016x}", fnv1a64(&bytes))
}

/// The hash of what an instance runs: the spec's hash, mixed with a restart token when
/// `flotilla restart` asked for new instances of an unchanged spec.
pub fn template_hash(spec: &ServiceSpec, restart_token: Option<&str>) -> String {
    let base = spec_hash(spec);
    match restart_token {
        None => base,
        Some(token) => format!("{:016x}", fnv1a64(format!("{base}/{token}").as_bytes())),
    }
}

/// FNV-1a 64 of `bytes` as 16 lowercase hex digits: a stable fingerprint (not a secure hash)
/// of content flotilla wrote or read itself.
pub fn content_digest(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a64(bytes))
}

/// The hash of what the service's instances should run now: its spec and its restart token
/// (the `flotilla.dev/restartedAt` annotation). The controller writes it to `status.specHash`
/// once it has seen that spec, so a client can tell a status that is about the latest spec.
pub fn target_hash(service: &crate::object::Service) -> String {
    template_hash(
        &service.spec,
        service
            .metadata
            .annotations
            .get(crate::object::annotations::RESTARTED_AT)
            .map(String::as_str),
    )
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> ServiceSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn fnv_known_values() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn stable_and_ignores_replicas() {
        let a = spec(r#"{"command":"srv","replicas":3,"env":{"B":"2","A":"1"}}"#);
        let b = spec(r#"{"env":{"A":"1","B":"2"},"replicas":7,"command":"srv"}"#);
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert_eq!(spec_hash(&a).len(), 16);
        // Pinned: a change here changes every revision id in every store.
        let minimal = spec(r#"{"command":"srv","replicas":5}"#);
        let mut one = minimal.clone();
        one.replicas = 1;
        assert_eq!(
            serde_json::to_string(&one).unwrap(),
            r#"{"command":"srv","replicas":1,"restart":{"policy":"always","backoff_initial":"100ms","backoff_max":"30s"},"stop":{"signal":"SIGTERM","grace_period":"10s"}}"#
        );
        assert_eq!(spec_hash(&minimal), "a92023bd69c562c1");
        let c = spec(r#"{"command":"srv2"}"#);
        assert_ne!(spec_hash(&a), spec_hash(&c));
    }
}
