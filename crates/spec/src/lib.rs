//! flotilla's types, file parsing and validation. No IO: callers hand in text and a file name.

pub mod deploy;
pub mod error;
pub mod expand;
pub mod file;
pub mod hash;
pub mod load;
mod locate;
pub mod object;
pub mod path;
pub mod platform;
pub mod quantity;
pub mod resolve;
pub mod route;
pub mod service;
pub mod validate;

pub use deploy::{DeploySpec, Scale};
pub use error::{FieldError, SpecError, SpecErrors};
pub use expand::{ExpandError, expand, expand_with, is_var_name, template_vars};
pub use file::{
    CertificateSection, FlotillaFile, GatewayLimitsSection, GatewaySection, UpConfig,
    gateway_digest,
};
pub use hash::{content_digest, spec_hash, target_hash, template_hash};
pub use load::{parse_file, parse_service_json, parse_service_object_json, suggest};
pub use object::*;
pub use path::{FieldPath, PathSeg};
pub use platform::{PLATFORM_VARS, STOP_SIGNALS, normalize_signal_name, port_env_var};
pub use quantity::{ByteSize, Dur, Millicores};
pub use resolve::resolve_paths;
pub use route::RouteKey;
pub use service::*;
pub use validate::{
    RouteConflict, template_variables, validate_file, validate_hostname, validate_name,
    validate_routes_across, validate_service, validate_spec, validate_up,
};
