//! Least privilege on NATS: each service connects as its own user, whose permissions name the
//! streams, buckets, object stores and core subjects that service touches, and nothing else.
//! The table below is the one place those grants are written; the embedded server's
//! configuration, the test harness's and the compose stack's (`ops/nats/nats.conf`) are all
//! generated from it, and the test harness fails a test when the server logs a permission
//! violation, so every test also checks the table against what the code really does.
//!
//! One privileged user (`agent-factory`) provisions the topology and is held by the launcher,
//! the test harness and the compose stack's one-shot provisioner; the services never get it.
//! Workers get no NATS user at all: they reach the control plane over HTTP only.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::topology as t;

/// The privileged user: provisions streams and buckets, sees everything.
pub const ADMIN_USER: &str = "agent-factory";

/// Every service that connects to NATS, by the name it runs under.
pub const SERVICES: &[&str] = &["ingress", "queue-manager", "hydration", "scheduler", "push-dispatcher", "cleanup"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Stream info, message gets, consumers and their acks.
    Read,
    /// Read, plus publishing to the stream's subjects, purges and message deletes.
    Write,
}
use Access::{Read, Write};

/// What one service may touch.
struct Grant {
    service: &'static str,
    /// Raw streams: (stream, its subject prefix, access).
    streams: &'static [(&'static str, &'static str, Access)],
    buckets: &'static [(&'static str, Access)],
    objects: &'static [(&'static str, Access)],
    /// Core NATS subjects it publishes to (besides operation requests) and subscribes to.
    publish: &'static [&'static str],
    subscribe: &'static [&'static str],
}

/// Held by every service: leader leases, the stack clock, and the audit subject it appends to.
const EVERY_SERVICE_BUCKETS: &[(&str, Access)] = &[(t::LEADERS, Write), (t::SYSTEM, Read)];

const GRANTS: &[Grant] = &[
    Grant {
        service: "ingress",
        streams: &[(t::TELEGRAM_UPDATES_STREAM, t::TELEGRAM_UPDATES_SUBJECT_PREFIX, Write)],
        buckets: &[(t::TELEGRAM_BOTS, Read), (t::CONSOLE_SESSIONS, Write)],
        objects: &[(t::SNAPSHOT_ARCHIVES, Write), (t::MEDIA, Write)],
        // `/readyz` pings every service.
        publish: &["af.health.>", crate::console_events::WANTED],
        subscribe: &[crate::console_events::SUBJECT],
    },
    Grant {
        service: "queue-manager",
        streams: &[(t::INBOX_STREAM, t::INBOX_SUBJECT_PREFIX, Write)],
        buckets: &[
            (t::QUEUE_STATE, Write),
            (t::DEAD_LETTERS, Write),
            // The test clock's operations (`advanceTestClock`, `setTestClock`).
            (t::SYSTEM, Write),
            (t::WORKERS, Write),
            (t::CONVERSATIONS, Write),
            (t::RUNTIME_CONFIG, Read),
            (t::PROFILES, Read),
            (t::MESSAGE_METADATA, Read),
            (t::ATTACHMENTS, Read),
        ],
        objects: &[],
        publish: &[t::DEMAND_SUBJECT, crate::console_events::SUBJECT],
        subscribe: &[crate::console_events::WANTED],
    },
    Grant {
        service: "hydration",
        streams: &[
            (t::INBOX_STREAM, t::INBOX_SUBJECT_PREFIX, Read),
            (t::HISTORY_STREAM, t::HISTORY_SUBJECT_PREFIX, Write),
            (t::TELEGRAM_UPDATES_STREAM, t::TELEGRAM_UPDATES_SUBJECT_PREFIX, Write),
            (crate::audit::STREAM, crate::audit::SUBJECT_PREFIX, Read),
        ],
        buckets: &[
            (t::PROFILES, Write),
            (t::SECRETS, Write),
            (t::RUNTIME_CONFIG, Write),
            (t::CONVERSATIONS, Read),
            (t::QUEUE_STATE, Read),
            (t::WORKERS, Read),
            (t::DEAD_LETTERS, Read),
            (t::HISTORY_CACHE, Write),
            (t::SNAPSHOTS, Write),
            (t::BINDINGS, Write),
            (t::SKILLS, Write),
            (t::ATTACHMENTS, Write),
            (t::MESSAGE_METADATA, Write),
            (t::TELEGRAM_BOTS, Write),
            (t::PAIRING, Write),
        ],
        objects: &[(t::SNAPSHOT_ARCHIVES, Write), (t::MEDIA, Write)],
        publish: &[crate::console_events::SUBJECT],
        subscribe: &[crate::console_events::WANTED],
    },
    Grant {
        service: "scheduler",
        streams: &[],
        buckets: &[(t::RUNTIME_CONFIG, Read), (t::SECRETS, Read)],
        objects: &[],
        publish: &[],
        subscribe: &[t::DEMAND_SUBJECT],
    },
    Grant {
        service: "push-dispatcher",
        streams: &[],
        buckets: &[
            (t::MESSAGE_TEMPLATES, Write),
            (t::PUSH_TEMPLATES, Write),
            (t::PUSH_JOBS, Write),
            (t::PUSH_DISPATCHES, Write),
            (t::BROADCASTS, Write),
            (t::PROFILES, Read),
            (t::BINDINGS, Read),
        ],
        objects: &[],
        publish: &[],
        subscribe: &[],
    },
    Grant {
        service: "cleanup",
        streams: &[],
        buckets: &[(t::SYSTEM, Write), (t::WORKERS, Write), (t::RUNTIME_CONFIG, Read), (t::SECRETS, Read)],
        objects: &[],
        publish: &[],
        subscribe: &[],
    },
];

/// The subjects `service` may publish to and subscribe to; `None` for an unknown service.
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

pub fn permissions(service: &str) -> Option<Permissions> {
    let grant = GRANTS.iter().find(|g| g.service == service)?;
    let mut publish = vec![
        // Opening any stream or bucket reads its configuration and counts, never its data.
        "$JS.API.INFO".to_string(),
        "$JS.API.STREAM.INFO.*".to_string(),
        // Operation requests; the request carries its caller's credential, checked by the
        // operation's owner.
        format!("{}.>", crate::ops::SUBJECT_PREFIX),
        crate::audit::subject(service),
    ];
    publish.extend(grant.publish.iter().map(|s| s.to_string()));
    for &(stream, prefix, access) in grant.streams {
        publish.extend(stream_subjects(stream, &format!("{prefix}.>"), access));
    }
    for &(bucket, access) in EVERY_SERVICE_BUCKETS.iter().chain(grant.buckets) {
        publish.extend(stream_subjects(&format!("KV_{bucket}"), &format!("$KV.{bucket}.>"), access));
    }
    for &(store, access) in grant.objects {
        publish.extend(stream_subjects(&format!("OBJ_{store}"), &format!("$O.{store}.>"), access));
    }
    let mut subscribe = vec![format!("{}.>", inbox_prefix(service)), crate::service::health_subject(service)];
    subscribe.extend(grant.subscribe.iter().map(|s| s.to_string()));
    subscribe.extend(
        crate::api::CATALOGUE.iter().filter(|op| op.service.as_str() == service).map(|op| crate::ops::subject(op.name)),
    );
    publish.sort();
    publish.dedup();
    subscribe.sort();
    subscribe.dedup();
    Some(Permissions { publish, subscribe })
}

/// The JetStream API subjects that read (or also write) one stream.
fn stream_subjects(stream: &str, data_subjects: &str, access: Access) -> Vec<String> {
    let mut subjects: Vec<String> = [
        "$JS.API.STREAM.MSG.GET.{s}",
        "$JS.API.DIRECT.GET.{s}",
        "$JS.API.DIRECT.GET.{s}.>",
        "$JS.API.CONSUMER.CREATE.{s}",
        "$JS.API.CONSUMER.CREATE.{s}.>",
        "$JS.API.CONSUMER.DURABLE.CREATE.{s}.>",
        "$JS.API.CONSUMER.INFO.{s}.>",
        "$JS.API.CONSUMER.DELETE.{s}.>",
        "$JS.API.CONSUMER.MSG.NEXT.{s}.>",
        "$JS.API.CONSUMER.NAMES.{s}",
        "$JS.API.CONSUMER.LIST.{s}",
        "$JS.ACK.{s}.>",
        "$JS.FC.{s}.>",
    ]
    .iter()
    .map(|p| p.replace("{s}", stream))
    .collect();
    if access == Write {
        subjects.push(format!("$JS.API.STREAM.PURGE.{stream}"));
        subjects.push(format!("$JS.API.STREAM.MSG.DELETE.{stream}"));
        subjects.push(data_subjects.to_string());
    }
    subjects
}

/// The reply-subject prefix of `service`'s connection: its own, so no other service can
/// subscribe to its replies (which carry operation results).
pub fn inbox_prefix(service: &str) -> String {
    format!("_INBOX_{service}")
}

/// The password of `service`'s user, derived from the privileged user's password so one local
/// secret file serves the whole one-process stack.
pub fn derived_password(admin_password: &str, service: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(admin_password.as_bytes()).expect("HMAC takes any key");
    mac.update(b"agent-factory nats user ");
    mac.update(service.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The `authorization { users = [...] }` block: the privileged user and one restricted user per
/// service. Passwords are written as given: a quoted literal, or `$NAME` for a variable the
/// server reads from its environment (the compose stack).
pub fn authorization_block(
    admin_user: &str,
    admin_password: &str,
    service_password: impl Fn(&str) -> String,
) -> String {
    let quoted = |items: &[String]| items.iter().map(|s| format!("\n        \"{s}\"")).collect::<String>() + "\n      ";
    let mut out = String::from("authorization {\n  users = [\n");
    out.push_str(&format!("    {{ user: \"{admin_user}\", password: {admin_password} }}\n"));
    for service in SERVICES {
        let p = permissions(service).expect("every service has a grant");
        out.push_str(&format!(
            "    {{ user: \"{service}\", password: {}, permissions: {{\n      publish: {{ allow: [{}] }}\n      \
             subscribe: {{ allow: [{}] }}\n      allow_responses: true\n    }} }}\n",
            service_password(service),
            quoted(&p.publish),
            quoted(&p.subscribe),
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

/// The whole configuration of the compose stack's nats-server (`ops/nats/nats.conf`): the users
/// with passwords from the environment, JetStream with its store encrypted at rest.
pub fn compose_server_config() -> String {
    let mut out = String::from(
        "# Generated from common/src/nats_access.rs; regenerate with\n\
         #   AF_UPDATE_DOCS=1 cargo nextest run -p tests -E 'test(nats_access)'\n\
         # Passwords and the store key come from the server's environment, the store directory\n\
         # from its command line (docker-compose.yml).\n\
         jetstream {\n  cipher: chachapoly\n  key: $AF_NATS_STORE_KEY\n}\n",
    );
    out.push_str(&authorization_block(ADMIN_USER, "$AF_NATS_PASSWORD", |service| {
        format!("${}", password_variable(service))
    }));
    out
}

/// The environment variable holding `service`'s NATS password in the compose stack.
pub fn password_variable(service: &str) -> String {
    format!("AF_NATS_PASSWORD_{}", service.to_uppercase().replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_reads_only_what_it_is_granted() {
        let ingress = permissions("ingress").unwrap();
        assert!(!ingress.publish.iter().any(|s| s.contains("AF_INBOX") || s.starts_with("af.inbox")));
        assert!(!ingress.publish.iter().any(|s| s.contains("KV_af_secrets")));
        assert!(ingress.subscribe.iter().all(|s| !s.starts_with("af.op.")), "ingress serves no operation");
        let queue = permissions("queue-manager").unwrap();
        assert!(queue.publish.contains(&"af.inbox.>".to_string()));
        assert!(queue.subscribe.contains(&"af.op.enqueueMessage".to_string()));
        assert!(!queue.subscribe.contains(&"af.op.importPlaintextSecret".to_string()));
        assert!(permissions("af-worker").is_none());
    }

    #[test]
    fn service_passwords_differ_and_are_stable() {
        let a = derived_password("pw", "ingress");
        assert_eq!(a, derived_password("pw", "ingress"));
        assert_ne!(a, derived_password("pw", "hydration"));
        assert_ne!(a, derived_password("other", "ingress"));
    }
}
