//! What flotilla promises a workload, in one place: the environment every instance gets and
//! the stop signals it may ask for. Validation checks specs against it and the agent builds
//! the environment from it, so the two cannot disagree.

use std::collections::BTreeMap;

/// The instance's name (`web-x7k2q`).
pub const INSTANCE_VAR: &str = "FLOTILLA_INSTANCE";
/// The service it belongs to.
pub const SERVICE_VAR: &str = "FLOTILLA_SERVICE";
/// The node it runs on.
pub const NODE_VAR: &str = "FLOTILLA_NODE";
/// The address the instance should listen on: its node's (`127.0.0.1` on one machine).
pub const HOST_VAR: &str = "FLOTILLA_HOST";
/// The host port of the service's first port.
pub const PORT_VAR: &str = "PORT";

/// Variables flotilla sets for every instance (besides `PORT` and `PORT_<NAME>`).
pub const PLATFORM_VARS: &[&str] = &[INSTANCE_VAR, SERVICE_VAR, NODE_VAR, HOST_VAR];

/// The environment variable holding the host port of a named port: `PORT_<NAME>`, upper-cased,
/// `-` → `_` (`admin-api` → `PORT_ADMIN_API`).
pub fn port_env_var(port: &str) -> String {
    format!("PORT_{}", port.to_ascii_uppercase().replace('-', "_"))
}

/// The platform's variables for one instance: [`PLATFORM_VARS`], `PORT` (the first of
/// `port_names` that has a port) and `PORT_<NAME>` for every port in `ports`.
pub fn platform_env(
    instance: &str,
    service: &str,
    node: &str,
    host: &str,
    port_names: &[String],
    ports: &BTreeMap<String, u16>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(INSTANCE_VAR.to_string(), instance.to_string());
    env.insert(SERVICE_VAR.to_string(), service.to_string());
    env.insert(NODE_VAR.to_string(), node.to_string());
    env.insert(HOST_VAR.to_string(), host.to_string());
    for (i, name) in port_names.iter().enumerate() {
        if let Some(p) = ports.get(name) {
            if i == 0 {
                env.insert(PORT_VAR.to_string(), p.to_string());
            }
            env.insert(port_env_var(name), p.to_string());
        }
    }
    env
}

/// Stop signals a service may ask for, in canonical form. The spec accepts each of them in any
/// case, with or without the `SIG` prefix (`SIGTERM`, `TERM`, `sigterm`, `term`).
pub const STOP_SIGNALS: &[&str] = &[
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2",
];

/// The canonical name (`SIGTERM`) of an allowed stop signal written in any accepted form.
pub fn normalize_signal_name(s: &str) -> Option<&'static str> {
    let upper = s.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    STOP_SIGNALS
        .iter()
        .copied()
        .find(|canon| canon.strip_prefix("SIG") == Some(bare))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_env_names_every_promised_variable() {
        let names = vec!["http".to_string(), "admin-api".to_string()];
        let ports = BTreeMap::from([
            ("http".to_string(), 20001),
            ("admin-api".to_string(), 20002),
        ]);
        let env = platform_env("web-1", "web", "n1", "127.0.0.1", &names, &ports);
        assert_eq!(env["PORT"], "20001");
        assert_eq!(env["PORT_HTTP"], "20001");
        assert_eq!(env["PORT_ADMIN_API"], "20002");
        for var in PLATFORM_VARS {
            assert!(env.contains_key(*var), "{var}");
        }
    }

    #[test]
    fn signal_names() {
        assert_eq!(normalize_signal_name("term"), Some("SIGTERM"));
        assert_eq!(normalize_signal_name(" SigUsr1 "), Some("SIGUSR1"));
        assert_eq!(normalize_signal_name("KILL"), None);
    }
}
