//! Worker rows in the index: claim and release bookkeeping, upserts, write-behind.

use super::*;

impl State {
    // ----- worker rows ----------------------------------------------------------------------

    pub(super) fn worker_claimed(
        &mut self,
        worker_id: &str,
        conversation_id: &str,
        agent_key: &str,
        lease_id: &str,
        now: Millis,
    ) {
        let entry = self.workers.entry(worker_id.to_string()).or_insert_with(|| WorkerEntry {
            row: WorkerRow {
                worker_id: worker_id.to_string(),
                provider: "fly".to_string(),
                volume_id: None,
                machine_ref: None,
                status: WorkerStatus::Active,
                load: 0,
                heartbeat_at: now,
                last_claim_at: None,
                scheduled_shutdown_at: None,
                stopped_at: None,
                last_snapshot_id: None,
                assignment: None,
                capabilities: Vec::new(),
            },
            revision: None,
            writing: false,
            dirty: true,
            waiters: Vec::new(),
            in_flight: Vec::new(),
        });
        let row = &mut entry.row;
        let same = row.assignment.as_ref().filter(|a| a.conversation_id == conversation_id);
        let urgent = same.is_none() || entry.revision.is_none();
        let assigned_at = same.map(|a| a.assigned_at).unwrap_or(now);
        row.assignment = Some(Assignment {
            conversation_id: conversation_id.to_string(),
            agent_key: agent_key.to_string(),
            lease_id: lease_id.to_string(),
            assigned_at,
        });
        row.status = WorkerStatus::Active;
        row.load += 1;
        row.heartbeat_at = now;
        row.last_claim_at = Some(now);
        row.scheduled_shutdown_at = None;
        row.stopped_at = None;
        entry.dirty = true;
        if urgent {
            self.flush_worker(worker_id);
        }
    }

    /// A job of `worker_id` ended: by complete/fail (`refresh` the heartbeat) or by lease
    /// recovery (`recovered`: the heartbeat is NOT refreshed, and the assignment is released).
    pub(super) fn worker_released(
        &mut self,
        worker_id: &str,
        conversation_id: &str,
        now: Millis,
        refresh: bool,
        recovered: bool,
    ) {
        let idle = self.q().idle_timeout_ms;
        let Some(entry) = self.workers.get_mut(worker_id) else {
            return;
        };
        if recovered && entry.row.status == WorkerStatus::Stopped {
            return;
        }
        let row = &mut entry.row;
        row.load = row.load.saturating_sub(1);
        if refresh {
            row.heartbeat_at = now;
        }
        row.scheduled_shutdown_at = workers::idle_deadline(row, now, idle);
        entry.dirty = true;
        let release =
            recovered && row.load == 0 && row.assignment.as_ref().is_some_and(|a| a.conversation_id == conversation_id);
        if release {
            row.assignment = None;
            let token = common::token::escape(conversation_id);
            if self.owner_of.get(&token).is_some_and(|w| w == worker_id) {
                self.owner_of.remove(&token);
            }
            self.flush_worker(worker_id);
        }
    }

    pub(super) fn upsert_worker(&mut self, args: UpsertWorkerArgs, reply: Reply) {
        let now = self.now();
        let worker_id = args.worker_id.to_string();
        let existing = self.workers.get(&worker_id).map(|w| &w.row);
        let old_assignment = existing.and_then(|r| r.assignment.clone());
        let row = match workers::apply_upsert(existing, args, now) {
            Ok(row) => row,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let status = row.status;
        let new_assignment = row.assignment.clone();
        let entry = self.workers.entry(worker_id.clone()).or_insert_with(|| WorkerEntry {
            row: row.clone(),
            revision: None,
            writing: false,
            dirty: true,
            waiters: Vec::new(),
            in_flight: Vec::new(),
        });
        entry.row = row;
        entry.dirty = true;
        entry.waiters.push(reply);
        if let Some(a) = &new_assignment {
            self.owner_of.insert(common::token::escape(&a.conversation_id), worker_id.clone());
        }
        if status != WorkerStatus::Active
            && let Some(p) = self.unpark(&worker_id)
        {
            self.end_park(p);
        }
        self.flush_worker(&worker_id);
        // Ownership may have changed: re-file the conversations involved.
        for a in [old_assignment, new_assignment].into_iter().flatten() {
            self.evaluate(&common::token::escape(&a.conversation_id));
        }
    }

    /// A snapshot of the worker's conversation became ready (`finalizeDataSnapshotUpload`):
    /// remember it, and let a draining worker proceed to `stopping` (the scheduler's snapshot
    /// gate). Unknown workers are left alone (`null`).
    pub(super) fn record_snapshot(&mut self, worker_id: String, snapshot_id: String, reply: Reply) {
        let now = self.now();
        let Some(entry) = self.workers.get_mut(&worker_id) else {
            let _ = reply.send(to_answer(Value::Null));
            return;
        };
        let row = &mut entry.row;
        row.last_snapshot_id = Some(snapshot_id);
        if row.status == WorkerStatus::Draining {
            row.status = WorkerStatus::Stopping;
            row.stopped_at = row.stopped_at.or(Some(now));
        }
        entry.dirty = true;
        entry.waiters.push(reply);
        self.flush_worker(&worker_id);
    }

    pub(super) fn flush_worker(&mut self, worker_id: &str) {
        let Some(entry) = self.workers.get_mut(worker_id) else {
            return;
        };
        if entry.writing || !entry.dirty {
            return;
        }
        entry.writing = true;
        entry.dirty = false;
        let waiters = std::mem::take(&mut entry.waiters);
        entry.in_flight.extend(waiters);
        let row = entry.row.clone();
        let revision = entry.revision;
        let store = self.ctx.buckets.workers.clone();
        let worker_id = worker_id.to_string();
        self.start_io(async move {
            let key = common::token::escape(&worker_id);
            let result = store.write(&key, &row, revision).await;
            Event::WorkerWritten { worker_id, result }
        });
    }

    pub(super) fn on_worker_written(&mut self, worker_id: String, result: Result<u64, StoreError>) {
        let Some(entry) = self.workers.get_mut(&worker_id) else {
            return;
        };
        match result {
            Ok(revision) => {
                entry.revision = Some(revision);
                entry.writing = false;
                // Answered as the original's views show a row: every field, null when unset.
                let row = WorkerView::from(entry.row.clone());
                for waiter in entry.in_flight.drain(..) {
                    let _ = waiter.send(to_answer(&row));
                }
                if entry.dirty && !entry.waiters.is_empty() {
                    self.flush_worker(&worker_id);
                }
            }
            Err(e) if e.is_conflict() => {
                let store = self.ctx.buckets.workers.clone();
                self.start_io(async move {
                    let key = common::token::escape(&worker_id);
                    let revision = store.get::<Value>(&key).await.ok().flatten().map(|v| v.revision);
                    Event::WorkerReloaded { worker_id, revision }
                });
            }
            Err(e) => {
                tracing::error!(worker = %worker_id, error = %e, "worker row write failed");
                entry.writing = false;
                entry.dirty = true;
                for waiter in entry.in_flight.drain(..).chain(entry.waiters.drain(..)) {
                    let _ = waiter.send(Err(OpError::unavailable("the worker store is unavailable; retry")));
                }
            }
        }
    }

    /// Writes rows whose changes may wait (heartbeat times, load), held completions (so none
    /// stays unstored for more than a tick), and the replay watermark.
    pub(super) fn flush_lazy(&mut self) {
        let dirty: Vec<String> =
            self.workers.iter().filter(|(_, w)| w.dirty && !w.writing).map(|(k, _)| k.clone()).collect();
        for worker_id in dirty {
            self.flush_worker(&worker_id);
        }
        let held: Vec<String> = self.unflushed.keys().cloned().collect();
        for token in held {
            self.flush_conv(&token, None);
        }
        if !self.serving {
            return;
        }
        // A held completion's message must still be replayed after a failover.
        let watermark = self
            .convs
            .values()
            .filter_map(|c| c.pending.front().map(|p| p.seq))
            .chain(self.unflushed.values().copied())
            .min()
            .unwrap_or(self.last_seq + 1);
        if watermark > self.watermark && !self.watermark_writing {
            self.watermark_writing = true;
            let store = self.ctx.buckets.queue_state.clone();
            let revision = self.watermark_revision;
            self.start_io(async move {
                let result = store.write(WATERMARK_KEY, &watermark, revision).await;
                let ok = result.is_ok();
                let revision = match result {
                    Ok(rev) => Some(rev),
                    // Another writer moved it; re-read the revision and try again next tick.
                    Err(_) => store.get::<Value>(WATERMARK_KEY).await.ok().flatten().map(|v| v.revision),
                };
                Event::WatermarkWritten { watermark, revision, ok }
            });
        }
    }
}
