//! Kubernetes manifests → flotilla services (`[service.NAME]` tables of a flotilla file).
//!
//! Every field is either mapped, accepted because it changes nothing here (`imagePullPolicy`,
//! the server-set metadata of `kubectl get -o yaml`), or refused with its file, line, column
//! and YAML path and what is supported instead. Nothing is skipped silently.

use std::collections::BTreeMap;

use base64::Engine;
use toml::{Table, Value as Toml};

use crate::yaml::{self, Node, Pos, Value};

/// One manifest file: the name errors give, and its text.
pub struct Input {
    pub file: String,
    pub text: String,
}

/// A refusal or a warning: file, line, column, YAML path and what (displayed as
/// `file:line:col: path: message`, as the flotilla file's own errors).
pub type Diag = flotilla_spec::SpecError;

/// Image → the command (and default arguments) that runs it here, until a container driver
/// exists. Read from `--image-map FILE`: `"registry/app:1.2" = { command = "…", args = […] }`.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    images: BTreeMap<String, (String, Vec<String>)>,
}

impl ImageMap {
    /// Parses an image map file (TOML); errors name the image.
    pub fn parse(text: &str) -> Result<Self, String> {
        let table: Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        let mut images = BTreeMap::new();
        for (image, entry) in table {
            let t = entry.as_table().ok_or_else(|| {
                format!("{image:?}: expected {{ command = \"…\", args = [...] }}")
            })?;
            for key in t.keys() {
                if key != "command" && key != "args" {
                    return Err(format!(
                        "{image:?}.{key}: unknown field (supported: command, args)"
                    ));
                }
            }
            let command = t
                .get("command")
                .and_then(Toml::as_str)
                .filter(|c| !c.is_empty())
                .ok_or_else(|| format!("{image:?}.command: a non-empty string is required"))?;
            let args = match t.get("args") {
                None => Vec::new(),
                Some(Toml::Array(a)) => a
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("{image:?}.args: expected a list of strings"))?,
                Some(_) => return Err(format!("{image:?}.args: expected a list of strings")),
            };
            images.insert(image, (command.to_string(), args));
        }
        Ok(Self { images })
    }

    /// The mapping of `image`: exact, else without its tag or digest.
    fn get(&self, image: &str) -> Option<&(String, Vec<String>)> {
        self.images.get(image).or_else(|| {
            let bare = image.split('@').next().unwrap_or(image);
            let bare = match bare.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => repo,
                _ => bare,
            };
            self.images.get(bare)
        })
    }
}

/// What an import produced.
#[derive(Debug, Default)]
pub struct Imported {
    /// `[service.NAME]` tables, by name.
    pub services: BTreeMap<String, Table>,
    pub warnings: Vec<Diag>,
    /// Some `env` value came from a Secret: the file is as private as the Secret.
    pub secrets: bool,
}

impl Imported {
    /// The services as a flotilla file.
    pub fn to_toml(&self) -> String {
        let mut root = Table::new();
        let services: Table = self
            .services
            .iter()
            .map(|(k, v)| (k.clone(), Toml::Table(v.clone())))
            .collect();
        root.insert("service".into(), Toml::Table(services));
        toml::to_string(&root).unwrap_or_default()
    }
}

/// Labels of a pod template.
type Labels = BTreeMap<String, String>;
/// A container's ports: (containerPort, the named port it becomes).
type PortNames = Vec<(i64, String)>;

/// A workload document, kept until the services it needs are known.
struct Workload<'a> {
    file: &'a str,
    prefix: String,
    kind: &'static str,
    name: String,
    node: &'a Node,
}

struct Data {
    values: BTreeMap<String, String>,
    secret: bool,
}

/// What a workload's parts read (the image map, ConfigMaps and Secrets) and where they write.
struct Build<'a> {
    images: &'a ImageMap,
    data: &'a BTreeMap<String, Data>,
    /// The `[service.NAME]` table.
    table: Table,
    /// Its `deploy` table.
    deploy: Table,
    warnings: &'a mut Vec<Diag>,
    /// Set once a value comes from a Secret.
    secrets: &'a mut bool,
}

/// A Service document: its selector and ports.
struct Svc<'a> {
    file: &'a str,
    prefix: String,
    name: String,
    node: &'a Node,
    selector: BTreeMap<String, String>,
    /// (name, port, targetPort)
    ports: Vec<(Option<String>, i64, Target)>,
}

#[derive(Clone)]
enum Target {
    Number(i64),
    Name(String),
}

struct Cx<'a> {
    file: &'a str,
    /// Where the object is in its document (`items[2].` in a `List`), before every path.
    prefix: &'a str,
    errors: &'a mut Vec<Diag>,
}

impl Cx<'_> {
    fn diag(&self, pos: Pos, path: &str, message: impl Into<String>) -> Diag {
        let path = match (self.prefix, path) {
            ("", p) => p.to_string(),
            (pre, "") => pre.trim_end_matches('.').to_string(),
            (pre, p) => format!("{pre}{p}"),
        };
        Diag {
            file: Some(self.file.to_string()),
            line: pos.line,
            col: pos.col,
            path,
            message: message.into(),
        }
    }

    fn err(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        let d = self.diag(pos, path, message);
        self.errors.push(d);
    }

    /// The mapping at `path`, with every key not in `supported` refused.
    fn fields<'n>(&mut self, n: &'n Node, path: &str, supported: &[&str]) -> Option<&'n Node> {
        let Some(entries) = n.entries() else {
            self.err(
                n.pos,
                path,
                format!("expected a mapping, found {}", n.kind()),
            );
            return None;
        };
        for (k, _) in entries {
            if !supported.contains(&k.name.as_str()) {
                self.err(
                    k.pos,
                    &join(path, &k.name),
                    format!("not supported (supported: {})", supported.join(", ")),
                );
            }
        }
        Some(n)
    }

    fn string(&mut self, n: &Node, path: &str) -> Option<String> {
        match &n.value {
            Value::Str(s) => Some(s.clone()),
            _ => {
                self.err(
                    n.pos,
                    path,
                    format!("expected a string, found {}", n.kind()),
                );
                None
            }
        }
    }

    fn int(&mut self, n: &Node, path: &str) -> Option<i64> {
        match n.value {
            Value::Int(i) => Some(i),
            _ => {
                self.err(
                    n.pos,
                    path,
                    format!("expected an integer, found {}", n.kind()),
                );
                None
            }
        }
    }

    fn list<'n>(&mut self, n: &'n Node, path: &str) -> &'n [Node] {
        match &n.value {
            Value::Seq(items) => items,
            Value::Null => &[],
            _ => {
                self.err(n.pos, path, format!("expected a list, found {}", n.kind()));
                &[]
            }
        }
    }

    /// The mappings of the list at `path`, each with its own path, every key not in
    /// `supported` refused (an item that is not a mapping is refused and left out).
    fn items<'n>(
        &mut self,
        n: &'n Node,
        path: &str,
        supported: &[&str],
    ) -> Vec<(String, &'n Node)> {
        let mut out = Vec::new();
        for (i, item) in self.list(n, path).iter().enumerate() {
            let p = index(path, i);
            if self.fields(item, &p, supported).is_some() {
                out.push((p, item));
            }
        }
        out
    }

    fn strings(&mut self, n: &Node, path: &str) -> Vec<String> {
        let items = self.list(n, path);
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.string(item, &index(path, i)))
            .collect()
    }

    fn string_map(&mut self, n: &Node, path: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match n.entries() {
            Some(entries) => {
                for (k, v) in entries {
                    if let Some(s) = self.string(v, &join(path, &k.name)) {
                        out.insert(k.name.clone(), s);
                    }
                }
            }
            None if n.is_null() => {}
            None => self.err(
                n.pos,
                path,
                format!("expected a mapping, found {}", n.kind()),
            ),
        }
        out
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Metadata fields the API server sets; `kubectl get -o yaml` prints them.
const SERVER_METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
];

/// Imports every document of `inputs`. All refusals are returned together.
pub fn import(inputs: &[Input], images: &ImageMap) -> Result<Imported, Vec<Diag>> {
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    for input in inputs {
        match yaml::parse(&input.text) {
            Ok(docs) => parsed.push((input.file.as_str(), docs)),
            Err(e) => errors.push(Diag {
                file: Some(input.file.clone()),
                line: e.pos.line,
                col: e.pos.col,
                path: String::new(),
                message: format!("not YAML: {}", e.message),
            }),
        }
    }
    // Documents, with `List`s opened.
    let mut docs: Vec<(&str, &Node, String)> = Vec::new();
    for (file, nodes) in &parsed {
        for node in nodes {
            let mut cx = Cx {
                file,
                prefix: "",
                errors: &mut errors,
            };
            match node.get("kind").and_then(Node::as_str) {
                Some("List") => {
                    cx.fields(node, "", &["apiVersion", "kind", "items", "metadata"]);
                    if let Some(items) = node.get("items") {
                        for (i, item) in cx.list(items, "items").iter().enumerate() {
                            docs.push((file, item, format!("items[{i}].")));
                        }
                    }
                }
                _ => docs.push((file, node, String::new())),
            }
        }
    }
    let mut data: BTreeMap<String, Data> = BTreeMap::new();
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    let mut ingresses = Vec::new();
    for (file, node, prefix) in &docs {
        let mut cx = Cx {
            file,
            prefix,
            errors: &mut errors,
        };
        let Some(kind_node) = node.get("kind") else {
            cx.err(node.pos, "", "no `kind`: not a Kubernetes object");
            continue;
        };
        let kind = kind_node.as_str().unwrap_or_default();
        let api = node
            .get("apiVersion")
            .and_then(Node::as_str)
            .unwrap_or_default();
        let expected = match kind {
            "Deployment" | "DaemonSet" | "StatefulSet" => "apps/v1",
            "Ingress" => "networking.k8s.io/v1",
            "Job" => "batch/v1",
            "CronJob" => "batch/v1",
            _ => "v1",
        };
        let kind_path = "kind".to_string();
        let supported_kinds = "Deployment, Pod, Service, Ingress, ConfigMap, Secret, List";
        match kind {
            "Deployment" | "Pod" | "Service" | "Ingress" | "ConfigMap" | "Secret" => {}
            "DaemonSet" => {
                cx.err(kind_node.pos, &kind_path, "DaemonSet: not supported yet (one instance per node needs the fleet's per-node services); use a Deployment with `placement` instead");
                continue;
            }
            "StatefulSet" | "Job" | "CronJob" => {
                cx.err(
                    kind_node.pos,
                    &kind_path,
                    format!("{kind}: not supported yet (flotilla has no such workload object; supported: {supported_kinds})"),
                );
                continue;
            }
            other => {
                cx.err(
                    kind_node.pos,
                    &kind_path,
                    format!("{other:?}: not supported (supported: {supported_kinds})"),
                );
                continue;
            }
        }
        if api != expected {
            let pos = node.get("apiVersion").map_or(node.pos, |n| n.pos);
            cx.err(
                pos,
                "apiVersion",
                format!("{api:?}: a {kind} is read as {expected}"),
            );
            continue;
        }
        let Some(name) = metadata(&mut cx, node) else {
            continue;
        };
        match kind {
            "ConfigMap" | "Secret" => {
                if let Some(d) = config_data(&mut cx, node, kind == "Secret") {
                    data.insert(format!("{kind}/{name}"), d);
                }
            }
            "Deployment" | "Pod" => workloads.push(Workload {
                file,
                prefix: prefix.clone(),
                kind: if kind == "Pod" { "Pod" } else { "Deployment" },
                name,
                node,
            }),
            "Service" => {
                if let Some(s) = service_doc(&mut cx, file, node, name) {
                    services.push(s);
                }
            }
            _ => ingresses.push((*file, *node, prefix.as_str())),
        }
    }
    let mut out = Imported::default();
    // name → (template labels, containerPort → port name)
    let mut shapes: BTreeMap<String, (Labels, PortNames)> = BTreeMap::new();
    let mut refused_labels: Vec<Labels> = Vec::new();
    for w in &workloads {
        let mut cx = Cx {
            file: w.file,
            prefix: &w.prefix,
            errors: &mut errors,
        };
        if out.services.contains_key(&w.name) {
            cx.err(
                w.node.pos,
                "metadata.name",
                format!("{:?}: a second workload of this name", w.name),
            );
            continue;
        }
        match workload(
            &mut cx,
            w,
            images,
            &data,
            &mut out.warnings,
            &mut out.secrets,
        ) {
            Some((table, labels, ports)) => {
                shapes.insert(w.name.clone(), (labels, ports));
                out.services.insert(w.name.clone(), table);
            }
            None => refused_labels.push(template_labels(w)),
        }
    }
    // What refers to a refused workload is not refused again: its error is the one to fix.
    let mut refused_services = std::collections::BTreeSet::new();
    // A Service names a workload by its selector: (service name, port) → (workload, port name).
    let mut backends: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
    for s in &services {
        let mut cx = Cx {
            file: s.file,
            prefix: &s.prefix,
            errors: &mut errors,
        };
        let matched: Vec<&String> = shapes
            .iter()
            .filter(|(_, (labels, _))| {
                !s.selector.is_empty() && s.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|(name, _)| name)
            .collect();
        let pos = s.node.get("spec").map_or(s.node.pos, |n| n.pos);
        let workload = match matched.as_slice() {
            [one] => (*one).clone(),
            [] if refused_labels.iter().any(|labels| {
                !s.selector.is_empty() && s.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            }) =>
            {
                refused_services.insert(s.name.clone());
                continue;
            }
            [] => {
                cx.err(
                    pos,
                    "spec.selector",
                    format!(
                        "Service {:?} selects no Deployment or Pod of these files",
                        s.name
                    ),
                );
                continue;
            }
            many => {
                cx.err(
                    pos,
                    "spec.selector",
                    format!(
                        "Service {:?} selects {} workloads ({}): flotilla routes a service to one",
                        s.name,
                        many.len(),
                        many.iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                continue;
            }
        };
        let ports = &shapes[&workload].1;
        for (i, (port_name, port, target)) in s.ports.iter().enumerate() {
            let named = match target {
                Target::Number(n) => ports
                    .iter()
                    .find(|(p, _)| p == n)
                    .map(|(_, name)| name.clone()),
                Target::Name(n) => ports
                    .iter()
                    .find(|(_, name)| name == n)
                    .map(|(_, name)| name.clone()),
            };
            let Some(named) = named else {
                cx.err(
                    pos,
                    &format!("spec.ports[{i}].targetPort"),
                    format!(
                        "no container port of {workload:?} is {}",
                        match target {
                            Target::Number(n) => n.to_string(),
                            Target::Name(n) => format!("named {n:?}"),
                        }
                    ),
                );
                continue;
            };
            backends.insert(
                (s.name.clone(), port.to_string()),
                (workload.clone(), named.clone()),
            );
            if let Some(pn) = port_name {
                backends.insert((s.name.clone(), pn.clone()), (workload.clone(), named));
            }
        }
    }
    for (file, node, prefix) in &ingresses {
        let mut cx = Cx {
            file,
            prefix,
            errors: &mut errors,
        };
        ingress(
            &mut cx,
            node,
            &backends,
            &refused_services,
            &mut out.services,
        );
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// `metadata`: the name, in the `default` namespace.
fn metadata(cx: &mut Cx, node: &Node) -> Option<String> {
    let path = "metadata".to_string();
    let Some(meta) = node.get("metadata") else {
        cx.err(node.pos, "", "no `metadata.name`");
        return None;
    };
    let mut supported = vec!["name", "namespace", "labels", "annotations"];
    supported.extend_from_slice(SERVER_METADATA);
    cx.fields(meta, &path, &supported)?;
    if let Some(ns) = meta.get("namespace") {
        let np = join(&path, "namespace");
        if let Some(n) = cx.string(ns, &np)
            && n != "default"
        {
            cx.err(
                ns.pos,
                &np,
                format!("{n:?}: only the `default` namespace is supported"),
            );
        }
    }
    if let Some(l) = meta.get("labels") {
        cx.string_map(l, &join(&path, "labels"));
    }
    match meta.get("name") {
        Some(n) => cx.string(n, &join(&path, "name")),
        None => {
            cx.err(meta.pos, &path, "no `name`");
            None
        }
    }
}

/// A ConfigMap's or a Secret's values (a Secret's `data` decoded from base64).
fn config_data(cx: &mut Cx, node: &Node, secret: bool) -> Option<Data> {
    let supported: &[&str] = if secret {
        &[
            "apiVersion",
            "kind",
            "metadata",
            "type",
            "data",
            "stringData",
            "immutable",
        ]
    } else {
        &["apiVersion", "kind", "metadata", "data", "immutable"]
    };
    cx.fields(node, "", supported)?;
    let mut values = BTreeMap::new();
    if let Some(d) = node.get("data") {
        let path = "data".to_string();
        for (k, v) in cx.string_map(d, &path) {
            if secret {
                match base64::engine::general_purpose::STANDARD.decode(v.trim()) {
                    Ok(bytes) => match String::from_utf8(bytes) {
                        Ok(s) => {
                            values.insert(k, s);
                        }
                        Err(_) => cx.err(
                            d.pos,
                            &join(&path, &k),
                            "not UTF-8 once decoded: an environment variable cannot hold it",
                        ),
                    },
                    Err(_) => cx.err(d.pos, &join(&path, &k), "not base64"),
                }
            } else {
                values.insert(k, v);
            }
        }
    }
    if let Some(d) = node.get("stringData") {
        values.extend(cx.string_map(d, "stringData"));
    }
    if let Some(t) = node.get("type") {
        let tp = "type".to_string();
        if let Some(t) = cx.string(t, &tp)
            && t != "Opaque"
        {
            // A TLS secret is only read by an Ingress; its keys are not environment values.
            if t != "kubernetes.io/tls" {
                cx.err(
                    node.get("type").map_or(node.pos, |n| n.pos),
                    &tp,
                    format!("{t:?}: not supported (supported: Opaque, kubernetes.io/tls)"),
                );
            }
        }
    }
    Some(Data { values, secret })
}

fn service_doc<'a>(cx: &mut Cx, file: &'a str, node: &'a Node, name: String) -> Option<Svc<'a>> {
    cx.fields(
        node,
        "",
        &["apiVersion", "kind", "metadata", "spec", "status"],
    )?;
    let path = "spec".to_string();
    let Some(spec) = node.get("spec") else {
        cx.err(node.pos, &path, "no `spec`");
        return None;
    };
    cx.fields(
        spec,
        &path,
        &[
            "selector",
            "ports",
            "type",
            "clusterIP",
            "clusterIPs",
            "sessionAffinity",
            "internalTrafficPolicy",
            "ipFamilies",
            "ipFamilyPolicy",
        ],
    )?;
    if let Some(t) = spec.get("type") {
        let tp = join(&path, "type");
        if let Some(t) = cx.string(t, &tp)
            && t != "ClusterIP"
        {
            cx.err(spec.get("type").map_or(spec.pos, |n| n.pos), &tp, format!("{t:?}: not supported (supported: ClusterIP; outside traffic reaches services through the gateway, an Ingress's routes)"));
        }
    }
    if let Some(a) = spec.get("sessionAffinity")
        && a.as_str() != Some("None")
    {
        cx.err(
            a.pos,
            &join(&path, "sessionAffinity"),
            "not supported (supported: None)",
        );
    }
    let selector = spec
        .get("selector")
        .map(|s| cx.string_map(s, &join(&path, "selector")))
        .unwrap_or_default();
    let mut ports = Vec::new();
    if let Some(p) = spec.get("ports") {
        let pp = join(&path, "ports");
        for (ip, item) in cx.items(p, &pp, &["name", "port", "targetPort", "protocol"]) {
            protocol_tcp(cx, item, &ip);
            let port_name = item
                .get("name")
                .and_then(|n| cx.string(n, &join(&ip, "name")));
            let Some(port) = item.get("port").and_then(|n| cx.int(n, &join(&ip, "port"))) else {
                cx.err(item.pos, &ip, "no `port`");
                continue;
            };
            let target = match item.get("targetPort").map(|n| &n.value) {
                None => Target::Number(port),
                Some(Value::Int(n)) => Target::Number(*n),
                Some(Value::Str(s)) => Target::Name(s.clone()),
                Some(_) => {
                    cx.err(
                        item.pos,
                        &join(&ip, "targetPort"),
                        "expected a port number or name",
                    );
                    continue;
                }
            };
            ports.push((port_name, port, target));
        }
    }
    Some(Svc {
        file,
        prefix: cx.prefix.to_string(),
        name,
        node,
        selector,
        ports,
    })
}

fn protocol_tcp(cx: &mut Cx, item: &Node, path: &str) {
    if let Some(p) = item.get("protocol")
        && p.as_str() != Some("TCP")
    {
        cx.err(
            p.pos,
            &join(path, "protocol"),
            "not supported (supported: TCP)",
        );
    }
}

/// A Deployment or a Pod: its service table, template labels and (containerPort, name) pairs.
fn workload(
    cx: &mut Cx,
    w: &Workload,
    images: &ImageMap,
    data: &BTreeMap<String, Data>,
    warnings: &mut Vec<Diag>,
    secrets: &mut bool,
) -> Option<(Table, Labels, PortNames)> {
    let node = w.node;
    cx.fields(
        node,
        "",
        &["apiVersion", "kind", "metadata", "spec", "status"],
    )?;
    let Some(spec) = node.get("spec") else {
        cx.err(node.pos, "spec", "no `spec`");
        return None;
    };
    let mut b = Build {
        images,
        data,
        table: Table::new(),
        deploy: Table::new(),
        warnings,
        secrets,
    };
    let (pod_spec, pod_path, labels) = if w.kind == "Deployment" {
        cx.fields(
            spec,
            "spec",
            &[
                "replicas",
                "selector",
                "template",
                "strategy",
                "minReadySeconds",
                "revisionHistoryLimit",
                "progressDeadlineSeconds",
            ],
        )?;
        if let Some(r) = spec.get("replicas")
            && let Some(n) = cx.int(r, "spec.replicas")
        {
            b.table.insert("replicas".into(), Toml::Integer(n));
        }
        if let Some(s) = spec.get("strategy") {
            strategy(cx, s, &mut b.deploy);
        }
        if let Some(m) = spec.get("minReadySeconds")
            && let Some(n) = cx.int(m, "spec.minReadySeconds")
        {
            b.deploy
                .insert("min_ready".into(), Toml::String(format!("{n}s")));
        }
        if let Some(m) = spec.get("revisionHistoryLimit")
            && let Some(n) = cx.int(m, "spec.revisionHistoryLimit")
        {
            b.deploy
                .insert("revision_history".into(), Toml::Integer(n.max(1)));
        }
        if let Some(m) = spec.get("progressDeadlineSeconds")
            && let Some(n) = cx.int(m, "spec.progressDeadlineSeconds")
        {
            b.deploy
                .insert("progress_deadline".into(), Toml::String(format!("{n}s")));
        }
        let Some(template) = spec.get("template") else {
            cx.err(spec.pos, "spec.template", "no `template`");
            return None;
        };
        cx.fields(template, "spec.template", &["metadata", "spec"])?;
        let mut labels = BTreeMap::new();
        if let Some(meta) = template.get("metadata") {
            cx.fields(
                meta,
                "spec.template.metadata",
                &["labels", "annotations", "name", "creationTimestamp"],
            );
            if let Some(l) = meta.get("labels") {
                labels = cx.string_map(l, "spec.template.metadata.labels");
            }
        }
        if let Some(sel) = spec.get("selector") {
            cx.fields(sel, "spec.selector", &["matchLabels"]);
            if let Some(m) = sel.get("matchLabels") {
                let want = cx.string_map(m, "spec.selector.matchLabels");
                if want.iter().any(|(k, v)| labels.get(k) != Some(v)) {
                    cx.err(
                        m.pos,
                        "spec.selector.matchLabels",
                        "does not match spec.template.metadata.labels",
                    );
                }
            }
        }
        let Some(ps) = template.get("spec") else {
            cx.err(template.pos, "spec.template.spec", "no `spec`");
            return None;
        };
        (ps, "spec.template.spec", labels)
    } else {
        let labels = node
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .map(|l| cx.string_map(l, "metadata.labels"))
            .unwrap_or_default();
        (spec, "spec", labels)
    };
    let ports = pod(cx, w, pod_spec, pod_path, &mut b)?;
    let Build {
        mut table, deploy, ..
    } = b;
    if !deploy.is_empty() {
        table.insert("deploy".into(), Toml::Table(deploy));
    }
    Some((table, labels, ports))
}

/// A workload's pod labels, read without judging anything (for a workload already refused).
fn template_labels(w: &Workload) -> Labels {
    let meta = if w.kind == "Deployment" {
        w.node
            .get("spec")
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("metadata"))
    } else {
        w.node.get("metadata")
    };
    meta.and_then(|m| m.get("labels"))
        .and_then(Node::entries)
        .map(|entries| {
            entries
                .iter()
                .filter_map(|(k, v)| Some((k.name.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn strategy(cx: &mut Cx, s: &Node, deploy: &mut Table) {
    let path = "spec.strategy";
    if cx.fields(s, path, &["type", "rollingUpdate"]).is_none() {
        return;
    }
    let kind = s
        .get("type")
        .and_then(Node::as_str)
        .unwrap_or("RollingUpdate");
    match kind {
        "RollingUpdate" => {}
        "Recreate" => {
            deploy.insert("max_surge".into(), Toml::Integer(0));
            deploy.insert("max_unavailable".into(), Toml::String("100%".into()));
            return;
        }
        other => {
            let pos = s.get("type").map_or(s.pos, |n| n.pos);
            cx.err(
                pos,
                "spec.strategy.type",
                format!("{other:?}: not supported (supported: RollingUpdate, Recreate)"),
            );
            return;
        }
    }
    let Some(r) = s.get("rollingUpdate") else {
        return;
    };
    if cx
        .fields(
            r,
            "spec.strategy.rollingUpdate",
            &["maxSurge", "maxUnavailable"],
        )
        .is_none()
    {
        return;
    }
    for (k8s, ours) in [
        ("maxSurge", "max_surge"),
        ("maxUnavailable", "max_unavailable"),
    ] {
        if let Some(v) = r.get(k8s) {
            let p = format!("spec.strategy.rollingUpdate.{k8s}");
            match &v.value {
                Value::Int(n) if *n >= 0 => {
                    deploy.insert(ours.into(), Toml::Integer(*n));
                }
                Value::Str(s) if s.ends_with('%') && s[..s.len() - 1].parse::<u32>().is_ok() => {
                    deploy.insert(ours.into(), Toml::String(s.clone()));
                }
                _ => cx.err(v.pos, &p, "expected a count or a percentage (\"25%\")"),
            }
        }
    }
}

/// The pod template: one container, its process.
fn pod(cx: &mut Cx, w: &Workload, spec: &Node, path: &str, b: &mut Build) -> Option<PortNames> {
    cx.fields(
        spec,
        path,
        &[
            "containers",
            "restartPolicy",
            "terminationGracePeriodSeconds",
            "securityContext",
            "nodeSelector",
            "tolerations",
            "dnsPolicy",
            "schedulerName",
            "serviceAccountName",
            "serviceAccount",
            "automountServiceAccountToken",
            "enableServiceLinks",
            "hostNetwork",
            "volumes",
        ],
    )?;
    if let Some(v) = spec.get("volumes") {
        let vp = join(path, "volumes");
        if let Some(first) = cx.list(v, &vp).first() {
            cx.err(first.pos, &index(&vp, 0), "volumes: not supported yet (an instance has its working directory; configuration reaches it through env)");
        }
    }
    for key in ["serviceAccountName", "serviceAccount"] {
        if let Some(sa) = spec.get(key)
            && sa.as_str() != Some("default")
        {
            cx.err(
                sa.pos,
                &join(path, key),
                "not supported (supported: default): instances get no Kubernetes API credentials",
            );
        }
    }
    let restart = spec
        .get("restartPolicy")
        .and_then(Node::as_str)
        .unwrap_or("Always");
    let policy = match (w.kind, restart) {
        (_, "Always") => "always",
        ("Pod", "OnFailure") => "on-failure",
        ("Pod", "Never") => "never",
        (_, other) => {
            let pos = spec.get("restartPolicy").map_or(spec.pos, |n| n.pos);
            cx.err(
                pos,
                &join(path, "restartPolicy"),
                format!("{other:?}: a {} restarts Always", w.kind),
            );
            "always"
        }
    };
    if policy != "always" {
        let mut r = Table::new();
        r.insert("policy".into(), Toml::String(policy.into()));
        b.table.insert("restart".into(), Toml::Table(r));
    }
    if let Some(g) = spec.get("terminationGracePeriodSeconds")
        && let Some(n) = cx.int(g, &join(path, "terminationGracePeriodSeconds"))
    {
        let mut stop = Table::new();
        stop.insert("grace_period".into(), Toml::String(format!("{n}s")));
        b.table.insert("stop".into(), Toml::Table(stop));
    }
    if let Some(sc) = spec.get("securityContext") {
        security_context(cx, sc, &join(path, "securityContext"), &mut b.table);
    }
    let mut placement = Table::new();
    if let Some(ns) = spec.get("nodeSelector") {
        let m = cx.string_map(ns, &join(path, "nodeSelector"));
        if !m.is_empty() {
            placement.insert(
                "node_selector".into(),
                Toml::Table(m.into_iter().map(|(k, v)| (k, Toml::String(v))).collect()),
            );
        }
    }
    if let Some(t) = spec.get("tolerations") {
        let tp = join(path, "tolerations");
        let mut out = Vec::new();
        for (ip, item) in cx.items(t, &tp, &["key", "operator", "value", "effect"]) {
            let mut tol = Table::new();
            if let Some(k) = item
                .get("key")
                .and_then(|k| cx.string(k, &join(&ip, "key")))
            {
                tol.insert("key".into(), Toml::String(k));
            } else {
                cx.err(
                    item.pos,
                    &ip,
                    "no `key` (a toleration of every taint is not supported)",
                );
                continue;
            }
            let op = item
                .get("operator")
                .and_then(Node::as_str)
                .unwrap_or("Equal");
            if op == "Equal"
                && let Some(v) = item
                    .get("value")
                    .and_then(|v| cx.string(v, &join(&ip, "value")))
            {
                tol.insert("value".into(), Toml::String(v));
            } else if op != "Exists" && op != "Equal" {
                cx.err(
                    item.pos,
                    &join(&ip, "operator"),
                    "not supported (supported: Equal, Exists)",
                );
            }
            out.push(Toml::Table(tol));
        }
        if !out.is_empty() {
            placement.insert("tolerations".into(), Toml::Array(out));
        }
    }
    if !placement.is_empty() {
        b.table.insert("placement".into(), Toml::Table(placement));
    }
    let cp = join(path, "containers");
    let containers = match spec.get("containers") {
        Some(c) => cx.list(c, &cp),
        None => &[],
    };
    let Some(container) = containers.first() else {
        cx.err(spec.pos, &cp, "no container");
        return None;
    };
    if let Some(second) = containers.get(1) {
        cx.err(second.pos, &index(&cp, 1), "a second container: not supported (an instance is one process; make each container a service of its own)");
    }
    container_into(cx, w, container, &index(&cp, 0), b)
}

fn security_context(cx: &mut Cx, sc: &Node, path: &str, table: &mut Table) {
    if cx
        .fields(sc, path, &["runAsUser", "runAsGroup", "runAsNonRoot"])
        .is_none()
    {
        return;
    }
    for (k8s, ours) in [("runAsUser", "user"), ("runAsGroup", "group")] {
        if let Some(v) = sc.get(k8s)
            && let Some(n) = cx.int(v, &join(path, k8s))
        {
            table.insert(ours.into(), Toml::String(n.to_string()));
        }
    }
    if let Some(v) = sc.get("runAsNonRoot")
        && v.value == Value::Bool(true)
        && sc.get("runAsUser").is_none_or(|u| u.value == Value::Int(0))
    {
        cx.err(
            v.pos,
            &join(path, "runAsNonRoot"),
            "true without a non-zero runAsUser: say which user",
        );
    }
}

fn container_into(
    cx: &mut Cx,
    w: &Workload,
    c: &Node,
    path: &str,
    b: &mut Build,
) -> Option<PortNames> {
    cx.fields(
        c,
        path,
        &[
            "name",
            "image",
            "command",
            "args",
            "workingDir",
            "env",
            "envFrom",
            "ports",
            "resources",
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
            "lifecycle",
            "securityContext",
            "imagePullPolicy",
            "terminationMessagePath",
            "terminationMessagePolicy",
        ],
    )?;
    // The process: the image's command, overridden as Kubernetes does (command replaces the
    // entrypoint and drops the image's arguments; args replaces the arguments).
    let command = c
        .get("command")
        .map(|n| cx.strings(n, &join(path, "command")));
    let args = c.get("args").map(|n| cx.strings(n, &join(path, "args")));
    let image = c
        .get("image")
        .and_then(|n| cx.string(n, &join(path, "image")));
    let mapped = image.as_deref().and_then(|i| b.images.get(i));
    let (program, mut argv) = match (&command, mapped) {
        (Some(cmd), _) if !cmd.is_empty() => (cmd[0].clone(), cmd[1..].to_vec()),
        (_, Some((program, default_args))) => (program.clone(), default_args.clone()),
        _ => {
            let pos = c.get("image").map_or(c.pos, |n| n.pos);
            cx.err(pos, &join(path, "image"), match &image {
                Some(i) => format!("{i:?}: no command to run it; map the image with --image-map FILE ({i:?} = {{ command = \"…\", args = [...] }}) or give the container a `command`"),
                None => "no image and no command".to_string(),
            });
            return None;
        }
    };
    if let Some(a) = args {
        argv = a;
    }
    b.table.insert("command".into(), Toml::String(program));
    if !argv.is_empty() {
        b.table.insert(
            "args".into(),
            Toml::Array(
                argv.into_iter()
                    .map(|a| Toml::String(k8s_to_expansion(&a)))
                    .collect(),
            ),
        );
    }
    if let Some(wd) = c
        .get("workingDir")
        .and_then(|n| cx.string(n, &join(path, "workingDir")))
    {
        b.table.insert("workdir".into(), Toml::String(wd));
    }
    // Ports: named as in the manifest, else `p<number>`.
    let mut ports: Vec<(i64, String)> = Vec::new();
    if let Some(p) = c.get("ports") {
        let pp = join(path, "ports");
        for (ip, item) in cx.items(p, &pp, &["name", "containerPort", "protocol"]) {
            protocol_tcp(cx, item, &ip);
            let Some(number) = item
                .get("containerPort")
                .and_then(|n| cx.int(n, &join(&ip, "containerPort")))
            else {
                cx.err(item.pos, &ip, "no `containerPort`");
                continue;
            };
            let name = item
                .get("name")
                .and_then(|n| cx.string(n, &join(&ip, "name")))
                .unwrap_or_else(|| format!("p{number}"));
            ports.push((number, name));
        }
    }
    if !ports.is_empty() {
        b.table.insert(
            "ports".into(),
            Toml::Array(ports.iter().map(|(_, n)| Toml::String(n.clone())).collect()),
        );
        b.warnings.push(cx.diag(c.get("ports").map_or(c.pos, |n| n.pos), &join(path, "ports"), format!(
                "{}: each instance gets its own host port, in ${{PORT}} (the first) and ${{PORT_<NAME>}}; the process must listen there, not on {}",
                w.name,
                ports.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>().join(", ")
            )));
    }
    let mut env = environment(cx, c, path, b);
    // `PORT` and `PORT_<NAME>` set to the container's own port numbers (as `flotilla export`
    // writes them) are what flotilla gives every instance anyway, with its host ports.
    for (i, (number, port)) in ports.iter().enumerate() {
        let n = number.to_string();
        if i == 0 && env.get("PORT") == Some(&n) {
            env.remove("PORT");
        }
        let var = flotilla_spec::port_env_var(port);
        if env.get(&var) == Some(&n) {
            env.remove(&var);
        }
    }
    if !env.is_empty() {
        b.table.insert(
            "env".into(),
            Toml::Table(env.into_iter().map(|(k, v)| (k, Toml::String(v))).collect()),
        );
    }
    if let Some(r) = c.get("resources") {
        resources(cx, r, &join(path, "resources"), &mut b.table, b.warnings);
    }
    let mut probes = Table::new();
    for (k8s, ours) in [
        ("startupProbe", "startup"),
        ("readinessProbe", "readiness"),
        ("livenessProbe", "liveness"),
    ] {
        if let Some(p) = c.get(k8s)
            && let Some(t) = probe(cx, p, &join(path, k8s), &ports)
        {
            probes.insert(ours.into(), Toml::Table(t));
        }
    }
    if !probes.is_empty() {
        b.table.insert("probes".into(), Toml::Table(probes));
    }
    if let Some(l) = c.get("lifecycle") {
        lifecycle(cx, l, &join(path, "lifecycle"), &mut b.deploy);
    }
    if let Some(sc) = c.get("securityContext") {
        security_context(cx, sc, &join(path, "securityContext"), &mut b.table);
    }
    Some(ports)
}

/// `$(VAR)` (Kubernetes' expansion) becomes `${VAR}`, `$$(VAR)` the literal `$(VAR)`, and any
/// other `$` is escaped, so flotilla's expansion changes nothing else.
fn k8s_to_expansion(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && flotilla_spec::is_var_name(&inner[..end])
        {
            out.push_str("${");
            out.push_str(&inner[..end]);
            out.push('}');
            rest = &inner[end + 1..];
        } else if let Some(escaped) = after.strip_prefix('$') {
            // `$$` is one literal `$` (Kubernetes' escape, as in `$$(VAR)`).
            out.push_str("$$");
            rest = escaped;
        } else {
            out.push_str("$$");
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn environment(cx: &mut Cx, c: &Node, path: &str, b: &mut Build) -> BTreeMap<String, String> {
    let data = b.data;
    let mut env = BTreeMap::new();
    let mut from_secrets = Vec::new();
    if let Some(ef) = c.get("envFrom") {
        let ep = join(path, "envFrom");
        for (ip, item) in cx.items(ef, &ep, &["configMapRef", "secretRef", "prefix"]) {
            let prefix = item
                .get("prefix")
                .and_then(Node::as_str)
                .unwrap_or_default();
            for (key, kind) in [("configMapRef", "ConfigMap"), ("secretRef", "Secret")] {
                let Some(r) = item.get(key) else { continue };
                let rp = join(&ip, key);
                if cx.fields(r, &rp, &["name", "optional"]).is_none() {
                    continue;
                }
                let Some(name) = r.get("name").and_then(|n| cx.string(n, &join(&rp, "name")))
                else {
                    continue;
                };
                match data.get(&format!("{kind}/{name}")) {
                    Some(d) => {
                        for (k, v) in &d.values {
                            env.insert(format!("{prefix}{k}"), k8s_escape(v));
                            if d.secret {
                                from_secrets.push(format!("{prefix}{k}"));
                            }
                        }
                    }
                    None if r
                        .get("optional")
                        .is_some_and(|o| o.value == Value::Bool(true)) => {}
                    None => cx.err(
                        r.pos,
                        &join(&rp, "name"),
                        format!("no {kind} {name:?} in these files"),
                    ),
                }
            }
        }
    }
    if let Some(e) = c.get("env") {
        let ep = join(path, "env");
        for (ip, item) in cx.items(e, &ep, &["name", "value", "valueFrom"]) {
            let Some(name) = item
                .get("name")
                .and_then(|n| cx.string(n, &join(&ip, "name")))
            else {
                cx.err(item.pos, &ip, "no `name`");
                continue;
            };
            if let Some(v) = item.get("value") {
                if let Some(v) = cx.string(v, &join(&ip, "value")) {
                    env.insert(name, k8s_to_expansion(&v));
                }
                continue;
            }
            let Some(vf) = item.get("valueFrom") else {
                env.insert(name, String::new());
                continue;
            };
            let vp = join(&ip, "valueFrom");
            if cx
                .fields(vf, &vp, &["configMapKeyRef", "secretKeyRef", "fieldRef"])
                .is_none()
            {
                continue;
            }
            if let Some(f) = vf.get("fieldRef") {
                let fp = join(&vp, "fieldRef");
                if cx.fields(f, &fp, &["fieldPath", "apiVersion"]).is_none() {
                    continue;
                }
                let field = f
                    .get("fieldPath")
                    .and_then(Node::as_str)
                    .unwrap_or_default();
                let var = match field {
                    "metadata.name" => "FLOTILLA_INSTANCE",
                    "spec.nodeName" => "FLOTILLA_NODE",
                    "status.podIP" | "status.hostIP" => "FLOTILLA_HOST",
                    other => {
                        cx.err(f.pos, &join(&fp, "fieldPath"), format!("{other:?}: not supported (supported: metadata.name, spec.nodeName, status.podIP, status.hostIP)"));
                        continue;
                    }
                };
                env.insert(name, format!("${{{var}}}"));
                continue;
            }
            for (key, kind) in [("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")] {
                let Some(r) = vf.get(key) else { continue };
                let rp = join(&vp, key);
                if cx.fields(r, &rp, &["name", "key", "optional"]).is_none() {
                    continue;
                }
                let (Some(obj), Some(k)) = (
                    r.get("name").and_then(|n| cx.string(n, &join(&rp, "name"))),
                    r.get("key").and_then(|n| cx.string(n, &join(&rp, "key"))),
                ) else {
                    cx.err(r.pos, &rp, "needs `name` and `key`");
                    continue;
                };
                let optional = r
                    .get("optional")
                    .is_some_and(|o| o.value == Value::Bool(true));
                match data.get(&format!("{kind}/{obj}")).map(|d| d.values.get(&k)) {
                    Some(Some(v)) => {
                        env.insert(name.clone(), k8s_escape(v));
                        if kind == "Secret" {
                            from_secrets.push(name.clone());
                        }
                    }
                    _ if optional => {}
                    Some(None) => cx.err(
                        r.pos,
                        &join(&rp, "key"),
                        format!("{kind} {obj:?} has no key {k:?}"),
                    ),
                    None => cx.err(
                        r.pos,
                        &join(&rp, "name"),
                        format!("no {kind} {obj:?} in these files"),
                    ),
                }
            }
        }
    }
    if !from_secrets.is_empty() {
        *b.secrets = true;
        b.warnings.push(cx.diag(c.pos, path, format!(
                "{} come from Secrets: their values are written into the flotilla file as plain env; keep it as private as the Secret",
                from_secrets.join(", ")
            )));
    }
    env
}

/// A value taken as it is: every `$` escaped for flotilla's expansion.
fn k8s_escape(v: &str) -> String {
    v.replace('$', "$$")
}

fn resources(cx: &mut Cx, r: &Node, path: &str, table: &mut Table, warnings: &mut Vec<Diag>) {
    if cx.fields(r, path, &["limits", "requests"]).is_none() {
        return;
    }
    let read = |cx: &mut Cx, which: &str| -> BTreeMap<String, (String, Pos)> {
        let mut out = BTreeMap::new();
        let Some(n) = r.get(which) else { return out };
        let wp = join(path, which);
        if cx.fields(n, &wp, &["cpu", "memory"]).is_none() {
            return out;
        }
        for key in ["cpu", "memory"] {
            let Some(v) = n.get(key) else { continue };
            let kp = join(&wp, key);
            let text = match &v.value {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                _ => {
                    cx.err(
                        v.pos,
                        &kp,
                        format!("expected a quantity, found {}", v.kind()),
                    );
                    continue;
                }
            };
            let ok = if key == "cpu" {
                flotilla_spec::quantity::parse_cpu(&text).map(|_| ())
            } else {
                flotilla_spec::quantity::parse_bytes(&text).map(|_| ())
            };
            match ok {
                Ok(()) => {
                    out.insert(key.to_string(), (text, v.pos));
                }
                Err(e) => cx.err(v.pos, &kp, e),
            }
        }
        out
    };
    let limits = read(cx, "limits");
    let requests = read(cx, "requests");
    let mut res = Table::new();
    for key in ["cpu", "memory"] {
        // flotilla reserves what it enforces: the limit; a request alone becomes the limit.
        match (limits.get(key), requests.get(key)) {
            (Some((l, _)), _) => {
                res.insert(key.into(), Toml::String(l.clone()));
            }
            (None, Some((q, pos))) => {
                warnings.push(cx.diag(*pos, &join(&join(path, "requests"), key), format!("a request without a limit: flotilla reserves and enforces one figure, so {q} becomes the limit")));
                res.insert(key.into(), Toml::String(q.clone()));
            }
            (None, None) => {}
        }
    }
    if !res.is_empty() {
        table.insert("resources".into(), Toml::Table(res));
    }
}

fn probe(cx: &mut Cx, p: &Node, path: &str, ports: &[(i64, String)]) -> Option<Table> {
    cx.fields(
        p,
        path,
        &[
            "httpGet",
            "tcpSocket",
            "exec",
            "initialDelaySeconds",
            "periodSeconds",
            "timeoutSeconds",
            "successThreshold",
            "failureThreshold",
            "terminationGracePeriodSeconds",
        ],
    )?;
    let mut t = Table::new();
    let port_of = |cx: &mut Cx, n: Option<&Node>, at: &str| -> Option<Option<String>> {
        let Some(n) = n else { return Some(None) };
        let found = match &n.value {
            Value::Int(i) => ports.iter().find(|(p, _)| p == i),
            Value::Str(s) => ports.iter().find(|(_, name)| name == s),
            _ => None,
        };
        match found {
            Some((_, name)) => Some(Some(name.clone())),
            None => {
                cx.err(
                    n.pos,
                    at,
                    "not a port of the container's `ports` (flotilla probes a named port)",
                );
                None
            }
        }
    };
    let mut kinds = 0;
    if let Some(h) = p.get("httpGet") {
        kinds += 1;
        let hp = join(path, "httpGet");
        cx.fields(h, &hp, &["path", "port", "scheme"])?;
        if let Some(s) = h.get("scheme")
            && s.as_str() != Some("HTTP")
        {
            cx.err(
                s.pos,
                &join(&hp, "scheme"),
                "not supported (supported: HTTP)",
            );
        }
        let mut http = Table::new();
        if let Some(path_node) = h.get("path")
            && let Some(s) = cx.string(path_node, &join(&hp, "path"))
        {
            http.insert("path".into(), Toml::String(s));
        }
        if let Some(port) = port_of(cx, h.get("port"), &join(&hp, "port"))? {
            http.insert("port".into(), Toml::String(port));
        }
        t.insert("http".into(), Toml::Table(http));
    }
    if let Some(s) = p.get("tcpSocket") {
        kinds += 1;
        let sp = join(path, "tcpSocket");
        cx.fields(s, &sp, &["port"])?;
        let mut tcp = Table::new();
        if let Some(port) = port_of(cx, s.get("port"), &join(&sp, "port"))? {
            tcp.insert("port".into(), Toml::String(port));
        }
        t.insert("tcp".into(), Toml::Table(tcp));
    }
    if let Some(e) = p.get("exec") {
        kinds += 1;
        let ep = join(path, "exec");
        cx.fields(e, &ep, &["command"])?;
        let cmd = e
            .get("command")
            .map(|c| cx.strings(c, &join(&ep, "command")))
            .unwrap_or_default();
        let mut exec = Table::new();
        exec.insert(
            "command".into(),
            Toml::Array(cmd.into_iter().map(Toml::String).collect()),
        );
        t.insert("exec".into(), Toml::Table(exec));
    }
    if kinds != 1 {
        cx.err(
            p.pos,
            path,
            "exactly one of httpGet, tcpSocket, exec is needed",
        );
        return None;
    }
    for (k8s, ours, secs) in [
        ("initialDelaySeconds", "initial_delay", true),
        ("periodSeconds", "period", true),
        ("timeoutSeconds", "timeout", true),
        ("successThreshold", "success_threshold", false),
        ("failureThreshold", "failure_threshold", false),
    ] {
        if let Some(v) = p.get(k8s)
            && let Some(n) = cx.int(v, &join(path, k8s))
        {
            t.insert(
                ours.into(),
                if secs {
                    Toml::String(format!("{n}s"))
                } else {
                    Toml::Integer(n)
                },
            );
        }
    }
    if let Some(g) = p.get("terminationGracePeriodSeconds") {
        cx.err(
            g.pos,
            &join(path, "terminationGracePeriodSeconds"),
            "not supported: the stop's grace period is the pod's terminationGracePeriodSeconds",
        );
    }
    Some(t)
}

/// `preStop` that only waits (`sleep N`, the usual way to let a load balancer drain) becomes
/// flotilla's `deploy.pre_stop_delay`; anything else is refused.
fn lifecycle(cx: &mut Cx, l: &Node, path: &str, deploy: &mut Table) {
    if cx.fields(l, path, &["preStop"]).is_none() {
        return;
    }
    let Some(pre) = l.get("preStop") else { return };
    let pp = join(path, "preStop");
    if cx.fields(pre, &pp, &["exec", "sleep"]).is_none() {
        return;
    }
    let seconds = if let Some(s) = pre.get("sleep") {
        s.get("seconds").and_then(|n| match n.value {
            Value::Int(i) => Some(i),
            _ => None,
        })
    } else if let Some(e) = pre.get("exec") {
        let cmd: Vec<String> = e
            .get("command")
            .map(|c| cx.strings(c, &join(&join(&pp, "exec"), "command")))
            .unwrap_or_default();
        let words: Vec<&str> = match cmd.as_slice() {
            [sh, c, script] if (sh.ends_with("sh")) && c == "-c" => {
                script.split_whitespace().collect()
            }
            other => other.iter().map(String::as_str).collect(),
        };
        match words.as_slice() {
            [sleep, n] if sleep.ends_with("sleep") => n.parse().ok(),
            _ => None,
        }
    } else {
        None
    };
    match seconds {
        Some(n) if n >= 0 => {
            deploy.insert("pre_stop_delay".into(), Toml::String(format!("{n}s")));
        }
        _ => cx.err(pre.pos, &pp, "only a wait is supported (`sleep N` or `sleep: {seconds: N}`: flotilla takes the instance out of the gateway, waits, then stops it)"),
    }
}

fn ingress(
    cx: &mut Cx,
    node: &Node,
    backends: &BTreeMap<(String, String), (String, String)>,
    refused: &std::collections::BTreeSet<String>,
    services: &mut BTreeMap<String, Table>,
) {
    if cx
        .fields(
            node,
            "",
            &["apiVersion", "kind", "metadata", "spec", "status"],
        )
        .is_none()
    {
        return;
    }
    let path = "spec".to_string();
    let Some(spec) = node.get("spec") else {
        cx.err(node.pos, &path, "no `spec`");
        return;
    };
    if cx
        .fields(
            spec,
            &path,
            &["rules", "ingressClassName", "defaultBackend"],
        )
        .is_none()
    {
        return;
    }
    let mut add = |cx: &mut Cx,
                   host: Option<String>,
                   route_path: String,
                   backend: &Node,
                   bp: &str| {
        if cx.fields(backend, bp, &["service"]).is_none() {
            return;
        }
        let Some(svc) = backend.get("service") else {
            cx.err(
                backend.pos,
                bp,
                "no `service` (resource backends are not supported)",
            );
            return;
        };
        let sp = join(bp, "service");
        if cx.fields(svc, &sp, &["name", "port"]).is_none() {
            return;
        }
        let Some(svc_name) = svc
            .get("name")
            .and_then(|n| cx.string(n, &join(&sp, "name")))
        else {
            return;
        };
        let port_key = match svc.get("port") {
            Some(p) => {
                if cx
                    .fields(p, &join(&sp, "port"), &["number", "name"])
                    .is_none()
                {
                    return;
                }
                match (
                    p.get("number").map(|n| &n.value),
                    p.get("name").and_then(Node::as_str),
                ) {
                    (Some(Value::Int(n)), _) => n.to_string(),
                    (_, Some(n)) => n.to_string(),
                    _ => {
                        cx.err(p.pos, &join(&sp, "port"), "needs `number` or `name`");
                        return;
                    }
                }
            }
            None => {
                cx.err(svc.pos, &join(&sp, "port"), "no `port`");
                return;
            }
        };
        if refused.contains(&svc_name) {
            return;
        }
        let Some((workload, port)) = backends.get(&(svc_name.clone(), port_key.clone())) else {
            cx.err(svc.pos, &sp, format!("no Service {svc_name:?} with port {port_key} in these files (one whose selector picks a Deployment or Pod)"));
            return;
        };
        let Some(table) = services.get_mut(workload) else {
            return;
        };
        let mut route = Table::new();
        if let Some(h) = host {
            route.insert("host".into(), Toml::String(h));
        }
        route.insert("path".into(), Toml::String(route_path));
        route.insert("port".into(), Toml::String(port.clone()));
        let routes = table
            .entry("routes")
            .or_insert_with(|| Toml::Array(Vec::new()));
        if let Toml::Array(a) = routes {
            a.push(Toml::Table(route));
        }
    };
    if let Some(d) = spec.get("defaultBackend") {
        add(cx, None, "/".into(), d, &join(&path, "defaultBackend"));
    }
    let rp = join(&path, "rules");
    let rules = match spec.get("rules") {
        Some(r) => cx.items(r, &rp, &["host", "http"]),
        None => Vec::new(),
    };
    for (ip, rule) in rules {
        let host = rule
            .get("host")
            .and_then(|h| cx.string(h, &join(&ip, "host")));
        let Some(http) = rule.get("http") else {
            continue;
        };
        let hp = join(&ip, "http");
        if cx.fields(http, &hp, &["paths"]).is_none() {
            continue;
        }
        let pp = join(&hp, "paths");
        let paths = match http.get("paths") {
            Some(p) => cx.items(p, &pp, &["path", "pathType", "backend"]),
            None => Vec::new(),
        };
        for (jp, item) in paths {
            if let Some(t) = item.get("pathType")
                && let Some(kind) = cx.string(t, &join(&jp, "pathType"))
                && kind != "Prefix"
                && kind != "ImplementationSpecific"
            {
                cx.err(t.pos, &join(&jp, "pathType"), format!("{kind:?}: not supported (supported: Prefix, ImplementationSpecific; routes match whole path segments)"));
                continue;
            }
            let route_path = item
                .get("path")
                .and_then(|p| cx.string(p, &join(&jp, "path")))
                .unwrap_or_else(|| "/".into());
            let Some(backend) = item.get("backend") else {
                cx.err(item.pos, &jp, "no `backend`");
                continue;
            };
            add(cx, host.clone(), route_path, backend, &join(&jp, "backend"));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dollar_forms() {
        assert_eq!(k8s_to_expansion("--port=$(PORT)"), "--port=${PORT}");
        assert_eq!(k8s_to_expansion("$$(X) $HOME $"), "$$(X) $$HOME $$");
        assert_eq!(k8s_escape("a$b"), "a$$b");
    }

    #[test]
    fn image_map() {
        let m =
            ImageMap::parse("\"ghcr.io/acme/web\" = { command = \"/bin/web\", args = [\"-v\"] }\n")
                .unwrap();
        assert_eq!(m.get("ghcr.io/acme/web:1.2").unwrap().0, "/bin/web");
        assert_eq!(m.get("ghcr.io/acme/web@sha256:00").unwrap().1, vec!["-v"]);
        assert!(m.get("localhost:5000/web").is_none());
        assert!(
            ImageMap::parse("x = { command = \"\" }")
                .unwrap_err()
                .contains("command")
        );
        assert!(
            ImageMap::parse("x = { command = \"a\", image = 1 }")
                .unwrap_err()
                .contains("image")
        );
    }
}
