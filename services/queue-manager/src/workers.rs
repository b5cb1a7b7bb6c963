//! Worker-row rules that need no I/O: the `upsertWorkerState` semantics of spec §3.14.2, the
//! `getWorkerControlState` verdict of §3.14.3, and the idle deadline set when load drops to 0.

use common::OpError;
use common::clock::Millis;
use common::model::{Assignment, MachineRef, WorkerRow, WorkerStatus};

use crate::model::{ControlState, UpsertWorkerArgs};

/// Applies `upsertWorkerState` to `existing` (or creates the row), at time `now`.
pub fn apply_upsert(existing: Option<&WorkerRow>, args: UpsertWorkerArgs, now: Millis) -> Result<WorkerRow, OpError> {
    let assignment = |a: crate::model::AssignmentArgs| Assignment {
        conversation_id: a.conversation_id.into_string(),
        agent_key: a.agent_key.into_string(),
        lease_id: a.lease_id,
        assigned_at: a.assigned_at.unwrap_or(now),
    };
    let machine_ref = match (&args.machine_id, &args.app_name) {
        (Some(machine_id), Some(app_name)) => {
            Some(MachineRef { app_name: app_name.clone(), machine_id: machine_id.clone(), region: args.region.clone() })
        }
        _ => None,
    };
    let ending = matches!(args.status, WorkerStatus::Stopping | WorkerStatus::Stopped);
    let Some(row) = existing else {
        return Ok(WorkerRow {
            worker_id: args.worker_id.into_string(),
            provider: args.provider,
            volume_id: args.volume_id,
            machine_ref,
            status: args.status,
            load: args.load,
            heartbeat_at: now,
            last_claim_at: None,
            scheduled_shutdown_at: args.scheduled_shutdown_at,
            stopped_at: if ending { Some(args.stopped_at.unwrap_or(now)) } else { None },
            last_snapshot_id: None,
            assignment: args.assignment.flatten().map(assignment),
            capabilities: Vec::new(),
        });
    };
    if !row.status.can_become(args.status) {
        return Err(OpError::conflict(format!(
            "Worker '{}' cannot transition from '{}' to '{}'.",
            row.worker_id,
            row.status.as_str(),
            args.status.as_str()
        )));
    }
    let mut next = row.clone();
    next.status = args.status;
    next.load = args.load;
    if args.status.is_running() {
        next.heartbeat_at = now;
    }
    next.scheduled_shutdown_at = args.scheduled_shutdown_at.or(row.scheduled_shutdown_at);
    next.stopped_at = if ending { args.stopped_at.or(row.stopped_at).or(Some(now)) } else { None };
    if args.clear_last_snapshot_id {
        next.last_snapshot_id = None;
    }
    next.volume_id = if args.clear_volume_id { None } else { args.volume_id.or(row.volume_id.clone()) };
    match args.assignment {
        None => {}
        Some(None) => next.assignment = None,
        Some(Some(a)) => next.assignment = Some(assignment(a)),
    }
    if args.clear_machine_ref {
        next.machine_ref = None;
    } else if machine_ref.is_some() {
        next.machine_ref = machine_ref;
    }
    Ok(next)
}

/// Whether a worker should stop, and why (spec §3.14.3).
pub fn control_state(row: Option<&WorkerRow>, now: Millis, stale_after_ms: i64) -> ControlState {
    let reason = match row {
        None => Some("missing_worker".to_string()),
        Some(r) if r.status != WorkerStatus::Active => Some(format!("status_{}", r.status.as_str())),
        Some(r) if r.heartbeat_at <= now - stale_after_ms => Some("stale_heartbeat".to_string()),
        Some(r) if r.scheduled_shutdown_at.is_some_and(|t| t <= now) => Some("scheduled_shutdown_due".to_string()),
        Some(_) => None,
    };
    ControlState { should_stop: reason.is_some(), reason }
}

/// The idle deadline once a worker's load is 0: kept if set, else counted from the last claim
/// (the original's rule, spec §3.4.4).
pub fn idle_deadline(row: &WorkerRow, now: Millis, idle_timeout_ms: i64) -> Option<Millis> {
    if row.load > 0 {
        None
    } else {
        Some(row.scheduled_shutdown_at.unwrap_or(row.last_claim_at.unwrap_or(now) + idle_timeout_ms))
    }
}

/// Whether `row` is the live sticky owner of a conversation at `now`.
pub fn is_fresh_owner(row: &WorkerRow, conversation_id: &str, now: Millis, stale_after_ms: i64) -> bool {
    row.status == WorkerStatus::Active
        && row.heartbeat_at > now - stale_after_ms
        && row.assignment.as_ref().is_some_and(|a| a.conversation_id == conversation_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AssignmentArgs;
    use common::ids::{AgentKey, ConversationId, WorkerId};

    fn args(status: WorkerStatus) -> UpsertWorkerArgs {
        UpsertWorkerArgs::new(WorkerId::trusted("w1"), "fly", status, 0)
    }

    #[test]
    fn stopped_preserves_heartbeat_and_sets_stopped_at() {
        let row = apply_upsert(None, args(WorkerStatus::Active), 1_000).unwrap();
        let row = apply_upsert(Some(&row), args(WorkerStatus::Draining), 2_000).unwrap();
        let row = apply_upsert(Some(&row), args(WorkerStatus::Stopping), 3_000).unwrap();
        assert_eq!(row.heartbeat_at, 3_000, "stopping is still running");
        assert_eq!(row.stopped_at, Some(3_000));
        let row = apply_upsert(Some(&row), args(WorkerStatus::Stopped), 9_000).unwrap();
        assert_eq!(row.heartbeat_at, 3_000, "stopped keeps the last heartbeat");
        assert_eq!(row.stopped_at, Some(3_000));
        let err = apply_upsert(Some(&row), args(WorkerStatus::Active), 10_000).unwrap_err();
        assert_eq!(err.message, "Worker 'w1' cannot transition from 'stopped' to 'active'.");
    }

    #[test]
    fn assignment_absent_null_or_object() {
        let mut a = args(WorkerStatus::Active);
        a.assignment = Some(Some(AssignmentArgs {
            conversation_id: ConversationId::trusted("c"),
            agent_key: AgentKey::trusted("k"),
            lease_id: "spawn:w1".into(),
            assigned_at: None,
        }));
        let row = apply_upsert(None, a, 5).unwrap();
        assert_eq!(row.assignment.as_ref().unwrap().assigned_at, 5);
        let row = apply_upsert(Some(&row), args(WorkerStatus::Active), 6).unwrap();
        assert!(row.assignment.is_some(), "absent leaves it unchanged");
        let mut clear = args(WorkerStatus::Active);
        clear.assignment = Some(None);
        assert!(apply_upsert(Some(&row), clear, 7).unwrap().assignment.is_none());
    }

    #[test]
    fn control_state_reasons() {
        let row = apply_upsert(None, args(WorkerStatus::Active), 1_000).unwrap();
        assert!(!control_state(Some(&row), 1_000, 420_000).should_stop);
        assert_eq!(control_state(None, 0, 1).reason.as_deref(), Some("missing_worker"));
        assert_eq!(control_state(Some(&row), 421_000, 420_000).reason.as_deref(), Some("stale_heartbeat"));
        let mut due = row.clone();
        due.scheduled_shutdown_at = Some(1_500);
        assert_eq!(control_state(Some(&due), 1_500, 420_000).reason.as_deref(), Some("scheduled_shutdown_due"));
        let draining = apply_upsert(Some(&row), args(WorkerStatus::Draining), 1_000).unwrap();
        assert_eq!(control_state(Some(&draining), 1_000, 420_000).reason.as_deref(), Some("status_draining"));
    }
}
