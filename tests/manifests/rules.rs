//! Rules the manifests keep, read from every rendered kustomization (no process runs here
//! but kubectl, git and the Secrets' generator): data nodes decide their role in the main
//! container and hand over before they stop, pinned Redis images with the October 2025 Lua
//! fixes, DNS egress that does not depend on which resolver a cluster runs, images a kind
//! cluster can load, Redis memory and buffers sized for the wire, Secrets generated at
//! install, never committed, and bidders that each get a key of their own.

use std::process::Command;

use serde_json::Value;

use crate::deploy::{self, DEPLOY, Rendered};

/// Every container of a pod spec, init containers included.
fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(move |key| spec[key].as_array().into_iter().flatten())
}

fn command(container: &Value) -> Vec<&str> {
    container["command"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().expect("string"))
        .collect()
}

fn pre_stop(container: &Value) -> Vec<&str> {
    command(&container["lifecycle"]["preStop"]["exec"])
}

/// A whole number from a container's environment, as the manifest sets it.
fn env_number(container: &Value, name: &str) -> u64 {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{} sets no whole number {name}", container["name"]))
}

fn each_kustomization(check: impl Fn(&Rendered)) {
    for dir in deploy::all_kustomizations() {
        check(&deploy::render(&dir));
    }
}

#[test]
fn data_nodes_decide_their_role_at_every_start_and_hand_over_before_they_stop() {
    each_kustomization(|r| {
        let dir = &r.dir;
        for name in ["redis", "redis-sentinel"] {
            assert_eq!(
                r.get("StatefulSet", name)["spec"]["podManagementPolicy"],
                "Parallel",
                "{dir}: {name} must not wait for ordered readiness (a replica whose master is gone never becomes ready)"
            );
        }

        let redis = r.pod_spec("StatefulSet", "redis");
        assert!(
            redis["initContainers"].as_array().is_none_or(Vec::is_empty),
            "{dir}: the data nodes decide their role in the main container (a container restart does not re-run init containers)"
        );
        let main = &redis["containers"][0];
        assert_eq!(
            command(main),
            ["sh", "/etc/redis-template/redis-start.sh"],
            "{dir}: redis"
        );
        assert_eq!(
            pre_stop(main),
            ["sh", "/etc/redis-template/redis-prestop.sh"],
            "{dir}: redis preStop"
        );
        // The preStop's own bounds (CATCH_UP_SECONDS 5, SWITCH_SECONDS 30) and redis-server's
        // shutdown (up to 10 s waiting for replicas) fit in the grace period.
        let grace = redis["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace");
        assert!(grace >= 5 + 30 + 10, "{dir}: redis grace {grace}s");
        // A restarted master's hold ends before the startup probe gives up on it.
        let startup = &main["startupProbe"];
        let patience = startup["periodSeconds"].as_u64().expect("period")
            * startup["failureThreshold"].as_u64().expect("threshold");
        let hold = env_number(main, "MASTER_HOLD_SECONDS");
        assert!(
            hold > 5 && hold < patience,
            "{dir}: MASTER_HOLD_SECONDS {hold} must exceed down-after (5 s) and stay under the startupProbe's {patience} s"
        );

        let sentinel = r.pod_spec("StatefulSet", "redis-sentinel");
        let main = &sentinel["containers"][0];
        assert_eq!(
            pre_stop(main),
            ["sh", "/etc/sentinel-template/sentinel-prestop.sh"],
            "{dir}: Sentinel preStop"
        );
        let grace = sentinel["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace");
        let wait = env_number(main, "FAILOVER_WAIT_SECONDS");
        assert!(grace > wait, "{dir}: Sentinel grace {grace}s <= {wait}s");
    });
}

/// `7.2.11` of `redis:7.2.11-alpine`.
fn redis_version(image: &str) -> Option<Vec<u32>> {
    let tag = image.strip_prefix("redis:")?;
    let version = tag.split('-').next()?;
    version.split('.').map(|n| n.parse().ok()).collect()
}

#[test]
fn redis_images_are_pinned_at_7_2_11_or_later() {
    each_kustomization(|r| {
        for workload in r.workloads() {
            for c in containers(&workload["spec"]["template"]["spec"]) {
                let image = c["image"].as_str().expect("image");
                if !image.starts_with("redis") {
                    continue;
                }
                let version = redis_version(image)
                    .unwrap_or_else(|| panic!("{}: {image} is not pinned to a version", r.dir));
                assert!(
                    version.len() == 3 && version >= vec![7, 2, 11],
                    "{}: {image}: the Lua fixes of October 2025 (CVE-2025-49844 and others) need 7.2.11 or later",
                    r.dir
                );
            }
        }
    });
}

#[test]
fn dns_egress_does_not_depend_on_which_resolver_the_cluster_runs() {
    each_kustomization(|r| {
        let policy = r.get("NetworkPolicy", "allow-dns");
        assert_eq!(policy["spec"]["podSelector"], serde_json::json!({}));
        let open = policy["spec"]["egress"]
            .as_array()
            .expect("egress")
            .iter()
            .find(|rule| rule["to"].as_array().is_none_or(Vec::is_empty))
            .unwrap_or_else(|| {
                panic!(
                    "{}: allow-dns names its destinations (kube-dns only breaks NodeLocal DNSCache and other resolvers)",
                    r.dir
                )
            });
        for protocol in ["UDP", "TCP"] {
            assert!(
                open["ports"]
                    .as_array()
                    .expect("ports")
                    .iter()
                    .any(|p| p["protocol"] == protocol && p["port"] == 53),
                "{}: allow-dns lacks {protocol} 53",
                r.dir
            );
        }
    });
}

#[test]
fn the_dev_overlay_runs_images_loaded_into_kind() {
    let r = deploy::render("overlays/dev");
    for workload in r.workloads() {
        for c in containers(&workload["spec"]["template"]["spec"]) {
            assert_eq!(
                c["imagePullPolicy"], "IfNotPresent",
                "overlays/dev: {} {}: `kind load docker-image` images are never pulled",
                workload["metadata"]["name"], c["name"]
            );
        }
    }
}

/// Bytes in a Redis size (`200mb`, `1gb`, `64kb`, plain bytes).
fn redis_bytes(size: &str) -> u64 {
    let size = size.to_ascii_lowercase();
    let (number, unit) = size.split_at(
        size.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(size.len()),
    );
    let unit = match unit {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        other => panic!("unknown Redis size unit {other:?} in {size}"),
    };
    number.parse::<u64>().expect("a number") * unit
}

/// Bytes in a Kubernetes quantity (`1Gi`, `512Mi`).
fn kube_bytes(quantity: &str) -> u64 {
    let (number, unit) = quantity.split_at(
        quantity
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(quantity.len()),
    );
    let unit = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("unexpected quantity unit {other:?} in {quantity}"),
    };
    number.parse::<u64>().expect("a number") * unit
}

#[test]
fn redis_memory_and_buffers_are_sized_for_the_wire() {
    each_kustomization(|r| {
        let conf = r.config_map("redis-config", "redis.conf");
        let lines: Vec<&str> = conf.lines().map(str::trim).collect();
        // The local topology (tests, demo, benchmark) runs with the same limits.
        for limit in auction_testkit::WIRE_LIMITS {
            assert!(
                lines.contains(&limit),
                "{}: redis.conf lacks `{limit}` (tests/testkit's WIRE_LIMITS)",
                r.dir
            );
        }
        let setting = |prefix: &str| -> Vec<&str> {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("{}: redis.conf sets no {prefix}", r.dir))
                .split_whitespace()
                .collect()
        };
        let maxmemory = redis_bytes(setting("maxmemory ")[0]);
        let replica_hard = redis_bytes(setting("client-output-buffer-limit replica ")[0]);
        let nodes = r.get("StatefulSet", "redis")["spec"]["replicas"]
            .as_u64()
            .expect("replicas");
        let limit = kube_bytes(
            r.pod_spec("StatefulSet", "redis")["containers"][0]["resources"]["limits"]["memory"]
                .as_str()
                .expect("a memory limit"),
        );
        // maxmemory counts the data and the clients' buffers; outside it: a fork's
        // copy-on-write (up to the data again), the replicas' output buffers, and 64 MiB for
        // the process itself and fragmentation.
        let needed = 2 * maxmemory + (nodes - 1) * replica_hard + (64 << 20);
        assert!(
            limit >= needed,
            "{}: the redis container's memory limit ({limit} bytes) leaves no headroom above maxmemory: {needed} needed (deploy/README.md \"Memory and buffers\")",
            r.dir
        );
    });
}

#[test]
fn secret_values_are_generated_at_install_and_never_committed() {
    let root = std::path::Path::new(DEPLOY)
        .parent()
        .expect("the repository");
    let git = |args: &[&str]| Command::new("git").arg("-C").arg(root).args(args).output();
    match git(&["rev-parse", "--is-inside-work-tree"]) {
        Ok(out) if out.status.success() => {}
        _ => {
            eprintln!("not a git checkout: cannot tell committed files apart; skipped");
            return;
        }
    }
    let r = deploy::render("base");
    for file in ["redis-users.env", "auction-admin.env", "auction-enroll.env"] {
        let path = format!("deploy/base/secrets/{file}");
        let ignored = git(&["check-ignore", "-q", &path]).expect("git check-ignore");
        assert!(ignored.status.success(), "{path} must be ignored by git");
    }
    let tracked = git(&["ls-files", "-z"]).expect("git ls-files");
    let files: Vec<String> = String::from_utf8_lossy(&tracked.stdout)
        .split('\0')
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect();
    let values: Vec<String> = r
        .objects
        .iter()
        .filter(|o| o["kind"] == "Secret")
        .flat_map(|o| o["data"].as_object().expect("data").values())
        .map(|v| {
            String::from_utf8(deploy::base64_decode(v.as_str().expect("string"))).expect("UTF-8")
        })
        .collect();
    assert!(
        values.len() >= 9,
        "the Secrets hold {} values",
        values.len()
    );
    for file in files {
        let Ok(text) = std::fs::read_to_string(root.join(&file)) else {
            continue;
        };
        for value in &values {
            assert!(
                !text.contains(value.as_str()),
                "{file} holds a value of the deployed Secrets: Secrets are generated at install (deploy/make-secrets.sh)"
            );
        }
    }
}

/// Where an env entry of a container comes from: `(secret, key)` of a `secretKeyRef`.
fn secret_ref<'a>(container: &'a Value, name: &str) -> Option<(&'a str, &'a str)> {
    let e = container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?;
    let r = &e["valueFrom"]["secretKeyRef"];
    Some((r["name"].as_str()?, r["key"].as_str()?))
}

#[test]
fn bids_must_be_signed_and_each_bidder_pod_enrolls_for_its_own_key_only() {
    each_kustomization(|r| {
        let server_workload = r.get("Deployment", "auction-server");
        let server = &r.pod_spec("Deployment", "auction-server")["containers"][0];
        let clients = r.get("StatefulSet", "auction-client");
        let client = &r.pod_spec("StatefulSet", "auction-client")["containers"][0];
        let env = r.container_env(server_workload, server, "auction-server-0");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("BID_AUTH"), Some("required"), "{}: the server", r.dir);

        // The server enrolls a name only for a caller its pod record in the bidders'
        // governing Service resolves to; that record exists before the pod is ready.
        let service = clients["spec"]["serviceName"]
            .as_str()
            .expect("serviceName");
        assert_eq!(
            get("ENROLL_HOST"),
            Some(format!("{{bidder}}.{service}").as_str()),
            "{}: ENROLL_HOST names the bidders' pods in their headless Service",
            r.dir
        );
        let governing = r.get("Service", service);
        assert_eq!(governing["spec"]["clusterIP"], "None", "{}", r.dir);
        assert_eq!(
            governing["spec"]["publishNotReadyAddresses"], true,
            "{}: a bidder enrolls before it is ready",
            r.dir
        );
        // A bidder's name is its pod's name: the name it enrolls is the one that resolves.
        let name = client["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == "BIDDER_NAME")
            .expect("BIDDER_NAME");
        assert_eq!(
            name["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name",
            "{}",
            r.dir
        );

        // Both sides share the enrollment token; bidders hold no key, no admin token, and
        // nothing else of the server's Secrets.
        let token = secret_ref(server, "ENROLL_TOKEN").expect("the server's ENROLL_TOKEN");
        assert_eq!(
            secret_ref(client, "ENROLL_TOKEN"),
            Some(token),
            "{}: the bidders' ENROLL_TOKEN",
            r.dir
        );
        let enroll_secret = &r.get("Secret", "auction-enroll")["metadata"]["name"];
        assert_eq!(
            (Some(token.0), token.1),
            (enroll_secret.as_str(), "ENROLL_TOKEN"),
            "{}",
            r.dir
        );
        assert_ne!(
            r.secret("auction-enroll", "ENROLL_TOKEN"),
            r.secret("auction-admin", "ADMIN_TOKEN"),
            "{}",
            r.dir
        );
        let pod = &clients["spec"]["template"]["spec"];
        let text = pod.to_string();
        for held in ["BIDDER_KEY", "auction-admin", "SERVER_PASSWORD"] {
            assert!(
                !text.contains(held),
                "{}: a bidder pod refers to {held}",
                r.dir
            );
        }
        assert!(
            pod["volumes"]
                .as_array()
                .is_none_or(|v| v.iter().all(|v| v["secret"].is_null())),
            "{}: no Secret is mounted into bidder pods",
            r.dir
        );
    });
}
