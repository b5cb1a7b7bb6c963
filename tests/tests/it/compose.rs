//! `docker-compose.yml` read as an operator's tools would: every file it mounts or builds from
//! exists, every image stage it names is in the Dockerfile, every agent-factory service gets
//! the tokens, the OTLP endpoint and a metrics port that Prometheus scrapes, and the
//! provisioning it mounts wires Prometheus to the alert rules and Grafana to both data sources.
//! (`ops/scripts/validate-compose.sh`, run by test.sh, checks the file with docker-compose.)

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::observability::read_yaml;

fn services(compose: &Value) -> Vec<(String, Value)> {
    compose["services"].as_object().expect("services").iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The agent-factory service containers (the control plane image, not the demo fake).
fn control_plane(compose: &Value) -> Vec<(String, Value)> {
    services(compose)
        .into_iter()
        // The fake and the one-shot provisioner are not services of the control plane.
        .filter(|(name, s)| s["image"] == "agent-factory:local" && name != "fake-telegram" && name != "provision")
        .collect()
}

#[test]
fn compose_mounts_and_builds_only_files_that_exist() {
    let root = tests::project_root();
    let compose = read_yaml(&root.join("docker-compose.yml"));
    let dockerfile_stages = |path: &Path| -> BTreeSet<String> {
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
            .filter_map(|l| {
                l.split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .find_map(|w| w[0].eq_ignore_ascii_case("as").then(|| w[1].to_string()))
            })
            .collect()
    };
    let mut mounts = 0;
    for (name, service) in services(&compose) {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let spec = volume.as_str().unwrap_or_else(|| panic!("{name}: volume {volume} in the short form"));
            let source = spec.split(':').next().expect("source");
            if source.starts_with("./") || source.starts_with('/') {
                mounts += 1;
                assert!(root.join(source).exists(), "{name} mounts {source}, which does not exist");
            } else {
                assert!(
                    compose["volumes"].get(source).is_some(),
                    "{name} mounts the named volume {source}, which the file does not declare"
                );
            }
        }
        if let Some(build) = service.get("build") {
            let context = root.join(build["context"].as_str().unwrap_or("."));
            assert!(context.is_dir(), "{name} builds from {}, which does not exist", context.display());
            let dockerfile = context.join(build["dockerfile"].as_str().unwrap_or("Dockerfile"));
            assert!(dockerfile.is_file(), "{name}: {} does not exist", dockerfile.display());
            if let Some(target) = build["target"].as_str() {
                let stages = dockerfile_stages(&dockerfile);
                assert!(
                    stages.contains(target),
                    "{name}: stage {target} is not in {}: {stages:?}",
                    dockerfile.display()
                );
            }
        }
    }
    assert!(mounts >= 5, "the provisioning, rules and collector config are mounted ({mounts})");

    // The binaries the containers run are the ones the image copies.
    let dockerfile = std::fs::read_to_string(root.join("ops/docker/Dockerfile")).expect("Dockerfile");
    for (name, service) in services(&compose).into_iter().filter(|(_, s)| s["image"] == "agent-factory:local") {
        let command = service["command"][0].as_str().unwrap_or_else(|| panic!("{name}: a command"));
        assert!(
            dockerfile.contains(&format!(" {command} ")) || dockerfile.contains(&format!(" {command};")),
            "{name} runs {command}, which ops/docker/Dockerfile does not copy into the image"
        );
    }
}

#[test]
fn compose_services_get_tokens_traces_and_metrics_and_prometheus_scrapes_each() {
    let root = tests::project_root();
    let compose = read_yaml(&root.join("docker-compose.yml"));
    let prometheus = read_yaml(&root.join("ops/prometheus/prometheus.yml"));
    let targets: BTreeSet<String> = prometheus["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| job["static_configs"].as_array().cloned().unwrap_or_default())
        .flat_map(|c| c["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    let control = control_plane(&compose);
    assert!(control.len() >= 6, "one container per service: {:?}", control.iter().map(|(n, _)| n).collect::<Vec<_>>());
    for (name, service) in &control {
        let env = &service["environment"];
        for key in [
            "AF_NATS__URL",
            "AF_AUTH__ADMIN_TOKEN",
            "AF_AUTH__APP_TOKEN",
            "AF_AUTH__WORKER_TOKEN_KEY",
            "AF_SECRETS__KEY",
        ] {
            assert!(env.get(key).is_some(), "{name} does not set {key}");
        }
        let nats_url = env["AF_NATS__URL"].as_str().unwrap_or_default();
        assert!(nats_url.starts_with(&format!("nats://{name}:")), "{name} connects as its own NATS user: {nats_url}");
        assert_eq!(env["AF_TELEMETRY__OTLP_ENDPOINT"], "http://otel-collector:4318", "{name} exports its spans");
        let bind = env["AF_TELEMETRY__METRICS_BIND"].as_str().unwrap_or_else(|| panic!("{name}: a metrics port"));
        let port = bind.rsplit(':').next().expect("port");
        let scraped =
            targets.contains(&format!("{name}:{port}")) || (name == "ingress" && targets.contains("ingress:8080"));
        assert!(scraped, "Prometheus does not scrape {name} ({targets:?})");
        assert_eq!(service["command"][0].as_str(), Some(name.as_str()), "{name} runs its own binary");
    }
    let worker = &compose["services"]["reference-worker"];
    let worker_port =
        worker["environment"]["AF_WORKER_METRICS_BIND"].as_str().expect("worker metrics").rsplit(':').next();
    assert!(targets.contains(&format!("reference-worker:{}", worker_port.expect("port"))), "the worker is scraped");
    assert_eq!(worker["build"]["target"], "worker", "the reference worker image");
    assert_eq!(compose["services"]["fake-telegram"]["profiles"][0], "demo");

    // NATS keeps its data on a named volume (JetStream on: by flag or in a mounted config file).
    let nats = &compose["services"]["nats"];
    let args: Vec<&str> = nats["command"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert!(args.iter().any(|a| ["-js", "--jetstream", "-c", "--config"].contains(a)), "JetStream on: {args:?}");
    let named = nats["volumes"].as_array().expect("volumes").iter().filter_map(Value::as_str).any(|v| {
        let source = v.split(':').next().unwrap_or_default();
        compose["volumes"].get(source).is_some()
    });
    assert!(named, "NATS data on a named volume");

    // Prometheus loads the alert rules it is given; Grafana gets both data sources.
    let rules: Vec<String> = prometheus["rule_files"]
        .as_array()
        .expect("rule_files")
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let prometheus_mounts = compose["services"]["prometheus"]["volumes"].as_array().expect("mounts").clone();
    for rule in &rules {
        let mounted =
            prometheus_mounts.iter().filter_map(Value::as_str).find(|m| m.split(':').nth(1) == Some(rule.as_str()));
        let source = mounted
            .unwrap_or_else(|| panic!("{rule} is not mounted into prometheus"))
            .split(':')
            .next()
            .expect("source");
        assert!(root.join(source).is_file(), "{source}");
    }
    let datasources = read_yaml(&root.join("ops/grafana/provisioning/datasources/prometheus.yml"));
    let kinds: BTreeSet<&str> =
        datasources["datasources"].as_array().expect("datasources").iter().filter_map(|d| d["type"].as_str()).collect();
    assert!(kinds.contains("prometheus") && kinds.contains("jaeger"), "{kinds:?}");
    let collector = read_yaml(&root.join("ops/otel/collector.yml"));
    let exporters = collector["service"]["pipelines"]["traces"]["exporters"].as_array().expect("exporters").clone();
    for exporter in exporters {
        let endpoint =
            collector["exporters"][exporter.as_str().expect("name")]["endpoint"].as_str().unwrap_or_default();
        let host = endpoint.split(':').next().unwrap_or_default();
        assert!(compose["services"].get(host).is_some(), "the collector exports to {endpoint}, not a compose service");
    }
}
