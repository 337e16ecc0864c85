//! Kubernetes manifests and flotilla: `flotilla import` reads Deployments, Pods, Services,
//! Ingresses, ConfigMaps and Secrets into flotilla services, refusing with file, line, column
//! and YAML path whatever it cannot honour.

pub mod export;
pub mod import;
pub mod yaml;

pub use export::{Exported, export};
pub use import::{Diag, ImageMap, Imported, Input, import};
