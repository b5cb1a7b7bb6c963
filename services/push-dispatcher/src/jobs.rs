//! Push templates and push jobs (spec §3.18.3, §3.18.4, §3.18.6).
//!
//! # Storage
//!
//! * `af_push_templates`: `t.<templateId>` documents and `k.<company token>.<key token>` key
//!   claims (create-only; a claim whose template is gone is taken over once
//!   [`crate::templates::STALE_CLAIM_MS`] old), so `(companyId, templateKey)` is unique.
//! * `af_push_jobs`: `j.<consumer token>.<jobId>` (a user's jobs are one prefix scan; a job is
//!   found by id with the filter `j.*.<jobId>`). Every write is a CAS on the job's revision.
//!   `nextRunAt` is the dispatcher's index: the dispatch loop watches this bucket.

use common::OpError;
use common::api;
use common::api::push::{
    CatchUp, CreatePushTemplateArgs, Periodicity, PushJobView, PushTemplateView, Schedule, UpdatePushJobArgs,
    UpdatePushTemplateArgs,
};
use common::auth::Caller;
use common::clock::Millis;
use common::ids::{AgentKey, PushJobId, PushTemplateId};
use common::ops::OpRegistry;
use common::service::ServiceContext;
use common::store::{JsonStore, StoreError, Versioned};
use common::token::escape;
use serde::{Deserialize, Serialize};

use crate::schedule;
use crate::target;

pub(crate) fn register(ctx: &ServiceContext, ops: &mut OpRegistry) {
    ops.handle::<api::CreatePushTemplate, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        create_template(&ctx, a).await
    });
    ops.handle::<api::UpdatePushTemplate, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        update_template(&ctx, a).await
    });
    ops.handle::<api::DeletePushTemplate, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        delete_template(&ctx, &a.template_id).await
    });
    ops.handle::<api::ListPushTemplatesByCompany, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let include_disabled = a.include_disabled.unwrap_or(false);
        let mut rows: Vec<PushTemplateView> = templates(&ctx)
            .scan::<PushTemplateView>("t.*")
            .await?
            .into_iter()
            .map(|(_, v)| v.value)
            .filter(|t| t.company_id == a.company_id.as_str() && (include_disabled || t.enabled))
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.updated_at));
        Ok(rows)
    });
    ops.handle::<api::CreatePushJobFromTemplate, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let new = from_template(&ctx, &a.company_id, &a.template_id, &a.timezone, a.schedule).await.map(
            |(title, text, periodicity, schedule)| NewJob {
                company_id: a.company_id.to_string(),
                consumer_user_id: a.consumer_user_id.to_string(),
                title,
                text,
                periodicity,
                timezone: a.timezone,
                schedule,
                enabled: a.enabled.unwrap_or(true),
                catch_up: a.catch_up.unwrap_or_default(),
                source_template_id: Some(a.template_id.to_string()),
            },
        )?;
        create_job(&ctx, new, None).await
    });
    ops.handle::<api::CreatePushJobFromTemplateForAgent, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let (title, text, periodicity, schedule) =
            from_template(&ctx, &a.company_id, &a.template_id, &a.timezone, a.schedule).await?;
        let new = NewJob {
            company_id: a.company_id.to_string(),
            consumer_user_id: a.consumer_user_id.to_string(),
            title,
            text,
            periodicity,
            timezone: a.timezone,
            schedule,
            enabled: a.enabled.unwrap_or(true),
            catch_up: a.catch_up.unwrap_or_default(),
            source_template_id: Some(a.template_id.to_string()),
        };
        create_job(&ctx, new, Some(&a.agent_key)).await
    });
    ops.handle::<api::CreatePushJobCustom, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let new = NewJob {
            company_id: a.company_id.to_string(),
            consumer_user_id: a.consumer_user_id.to_string(),
            title: a.title,
            text: a.text,
            periodicity: a.periodicity,
            timezone: a.timezone,
            schedule: a.schedule,
            enabled: a.enabled.unwrap_or(true),
            catch_up: a.catch_up.unwrap_or_default(),
            source_template_id: None,
        };
        create_job(&ctx, new, None).await
    });
    ops.handle::<api::CreatePushJobCustomForAgent, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let new = NewJob {
            company_id: a.company_id.to_string(),
            consumer_user_id: a.consumer_user_id.to_string(),
            title: a.title,
            text: a.text,
            periodicity: a.periodicity,
            timezone: a.timezone,
            schedule: a.schedule,
            enabled: a.enabled.unwrap_or(true),
            catch_up: a.catch_up.unwrap_or_default(),
            source_template_id: None,
        };
        create_job(&ctx, new, Some(&a.agent_key)).await
    });
    ops.handle::<api::UpdatePushJob, _, _, _, _>(
        ctx,
        |ctx, _: Caller, a| async move { update_job(&ctx, a, None).await },
    );
    ops.handle::<api::UpdatePushJobForAgent, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let owner = (a.consumer_user_id.to_string(), a.agent_key.to_string());
        let args = UpdatePushJobArgs {
            job_id: a.job_id,
            title: a.title,
            text: a.text,
            periodicity: a.periodicity,
            timezone: a.timezone,
            schedule: a.schedule,
            enabled: a.enabled,
            catch_up: a.catch_up,
            now_ms: a.now_ms,
        };
        update_job(&ctx, args, Some(owner)).await
    });
    ops.handle::<api::SetPushJobEnabled, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let args = UpdatePushJobArgs {
            job_id: a.job_id,
            title: None,
            text: None,
            periodicity: None,
            timezone: None,
            schedule: None,
            enabled: Some(a.enabled),
            catch_up: None,
            now_ms: a.now_ms,
        };
        update_job(&ctx, args, None).await
    });
    ops.handle::<api::DeletePushJob, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        loop {
            let Some((key, job)) = find_job(&ctx, &a.job_id).await? else { return Ok(false) };
            match jobs(&ctx).delete(&key, job.revision).await {
                Ok(()) => return Ok(true),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(OpError::from(e)),
            }
        }
    });
    ops.handle::<api::ListPushJobsForUser, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let include_disabled = a.include_disabled.unwrap_or(true);
        let rows = user_jobs(&ctx, &a.consumer_user_id).await?;
        Ok(rows.into_iter().filter(|j| include_disabled || j.enabled).collect::<Vec<_>>())
    });
    ops.handle::<api::ListPushJobsForAgent, _, _, _, _>(ctx, |ctx, _: Caller, a| async move {
        let include_disabled = a.include_disabled.unwrap_or(true);
        let rows = user_jobs(&ctx, &a.consumer_user_id).await?;
        Ok(rows
            .into_iter()
            .filter(|j| j.agent_key.as_deref() == Some(a.agent_key.as_str()))
            .filter(|j| include_disabled || j.enabled)
            .collect::<Vec<_>>())
    });
}

pub fn templates(ctx: &ServiceContext) -> &JsonStore {
    &ctx.buckets.push_templates
}

pub fn jobs(ctx: &ServiceContext) -> &JsonStore {
    &ctx.buckets.push_jobs
}

pub fn job_key(consumer_user_id: &str, job_id: &str) -> String {
    format!("j.{}.{job_id}", escape(consumer_user_id))
}

/// The job's key and document, found by id alone.
pub async fn find_job(ctx: &ServiceContext, id: &str) -> Result<Option<(String, Versioned<PushJobView>)>, OpError> {
    Ok(jobs(ctx).scan::<PushJobView>(&format!("j.*.{id}")).await?.into_iter().next())
}

/// A user's jobs, most recently updated first.
pub async fn user_jobs(ctx: &ServiceContext, user: &str) -> Result<Vec<PushJobView>, OpError> {
    let mut rows: Vec<PushJobView> = jobs(ctx)
        .scan::<PushJobView>(&format!("j.{}.*", escape(user)))
        .await?
        .into_iter()
        .map(|(_, v)| v.value)
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.updated_at));
    Ok(rows)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TemplateClaim {
    template_id: String,
    claimed_at: Millis,
}

fn template_claim_key(company: &str, key: &str) -> String {
    format!("k.{}.{}", escape(company), escape(key))
}

async fn create_template(ctx: &ServiceContext, a: CreatePushTemplateArgs) -> Result<PushTemplateId, OpError> {
    target::check_actor("actorUserId", &a.actor_user_id)?;
    schedule::validate_suggested(a.periodicity, &a.suggested_times)?;
    let id = PushTemplateId::trusted(target::mint("pt"));
    let now = ctx.clock.now_ms();
    let ck = template_claim_key(&a.company_id, &a.template_key);
    let mine = TemplateClaim { template_id: id.to_string(), claimed_at: now };
    let taken = || OpError::conflict(format!("Template key '{}' already exists for company", a.template_key));
    loop {
        match templates(ctx).create(&ck, &mine).await {
            Ok(_) => break,
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e.into()),
        }
        let Some(current) = templates(ctx).get::<TemplateClaim>(&ck).await? else { continue };
        let live = templates(ctx).get::<PushTemplateView>(&format!("t.{}", current.value.template_id)).await?.is_some();
        if live || now - current.value.claimed_at < crate::templates::STALE_CLAIM_MS {
            return Err(taken());
        }
        match templates(ctx).update(&ck, &mine, current.revision).await {
            Ok(_) => break,
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let doc = PushTemplateView {
        id: id.clone(),
        company_id: a.company_id.to_string(),
        template_key: a.template_key.to_string(),
        title: a.title,
        text: a.text,
        periodicity: a.periodicity,
        suggested_times: a.suggested_times.iter().map(schedule::normalise).collect(),
        enabled: a.enabled.unwrap_or(true),
        created_by: a.actor_user_id.clone(),
        updated_by: a.actor_user_id,
        created_at: now,
        updated_at: now,
    };
    templates(ctx).create(&format!("t.{id}"), &doc).await?;
    Ok(id)
}

async fn update_template(ctx: &ServiceContext, a: UpdatePushTemplateArgs) -> Result<bool, OpError> {
    target::check_actor("actorUserId", &a.actor_user_id)?;
    let key = format!("t.{}", a.template_id);
    let now = ctx.clock.now_ms();
    let mut missing = false;
    templates(ctx)
        .modify::<PushTemplateView, OpError, _>(&key, |current| {
            let Some(mut t) = current else {
                missing = true;
                return Ok(None);
            };
            let periodicity = a.periodicity.unwrap_or(t.periodicity);
            let times = a.suggested_times.clone().unwrap_or_else(|| t.suggested_times.clone());
            schedule::validate_suggested(periodicity, &times)?;
            t.periodicity = periodicity;
            t.suggested_times = times.iter().map(schedule::normalise).collect();
            if let Some(title) = &a.title {
                t.title = title.clone();
            }
            if let Some(text) = &a.text {
                t.text = text.clone();
            }
            if let Some(enabled) = a.enabled {
                t.enabled = enabled;
            }
            t.updated_by = a.actor_user_id.clone();
            t.updated_at = now;
            Ok(Some(t))
        })
        .await?;
    Ok(!missing)
}

async fn delete_template(ctx: &ServiceContext, id: &PushTemplateId) -> Result<bool, OpError> {
    let key = format!("t.{id}");
    loop {
        let Some(current) = templates(ctx).get::<PushTemplateView>(&key).await? else { return Ok(false) };
        match templates(ctx).delete(&key, current.revision).await {
            Ok(()) => {
                // Jobs made from it keep their (now dangling) sourceTemplateId, as the original.
                let ck = template_claim_key(&current.value.company_id, &current.value.template_key);
                if let Some(claim) = templates(ctx).get::<TemplateClaim>(&ck).await?
                    && claim.value.template_id == id.as_str()
                {
                    let _ = templates(ctx).delete(&ck, claim.revision).await;
                }
                return Ok(true);
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The title, text, periodicity and schedule a job made from a template gets (spec §3.18.4).
async fn from_template(
    ctx: &ServiceContext,
    company: &str,
    template_id: &PushTemplateId,
    timezone: &str,
    given: Option<Schedule>,
) -> Result<(String, String, Periodicity, Schedule), OpError> {
    schedule::time_zone(timezone)?;
    let template = templates(ctx)
        .get::<PushTemplateView>(&format!("t.{template_id}"))
        .await?
        .map(|v| v.value)
        .ok_or_else(|| OpError::not_found("Template not found"))?;
    if template.company_id != company {
        return Err(OpError::invalid("Template company mismatch"));
    }
    let schedule = if template.periodicity == Periodicity::Manual {
        Schedule::Manual
    } else if let Some(given) = given {
        given
    } else {
        template
            .suggested_times
            .iter()
            .find(|s| s.kind() == template.periodicity)
            .cloned()
            .ok_or_else(|| OpError::invalid("Schedule is required for non-manual template"))?
    };
    Ok((template.title, template.text, template.periodicity, schedule))
}

pub struct NewJob {
    pub company_id: String,
    pub consumer_user_id: String,
    pub title: String,
    pub text: String,
    pub periodicity: Periodicity,
    pub timezone: String,
    pub schedule: Schedule,
    pub enabled: bool,
    pub catch_up: CatchUp,
    pub source_template_id: Option<String>,
}

/// The next slot of a job after `from`, or none (manual or disabled).
pub fn next_for(job: &PushJobView, from: Millis) -> Result<Option<Millis>, OpError> {
    if !job.enabled {
        return Ok(None);
    }
    let Some(slot) = schedule::validate_for(job.periodicity, &job.schedule)? else { return Ok(None) };
    let tz = schedule::time_zone(&job.timezone)?;
    schedule::next_run_at(&slot, &tz, from).map(Some)
}

pub async fn create_job(ctx: &ServiceContext, new: NewJob, for_agent: Option<&AgentKey>) -> Result<PushJobId, OpError> {
    schedule::time_zone(&new.timezone)?;
    schedule::validate_for(new.periodicity, &new.schedule)?;
    let active = target::active_target(ctx, &new.consumer_user_id).await?.map(|t| t.agent_key);
    if let Some(agent) = for_agent
        && active.as_deref() != Some(agent.as_str())
    {
        return Err(OpError::invalid("Agent key must match the current active binding for the user"));
    }
    let now = ctx.clock.now_ms();
    let id = PushJobId::trusted(target::mint("pj"));
    let mut job = PushJobView {
        id: id.clone(),
        company_id: new.company_id,
        consumer_user_id: new.consumer_user_id,
        agent_key: for_agent.map(|a| a.to_string()).or(active),
        source_template_id: new.source_template_id,
        title: new.title,
        text: new.text,
        periodicity: new.periodicity,
        timezone: new.timezone.trim().to_string(),
        schedule: schedule::normalise(&new.schedule),
        enabled: new.enabled,
        next_run_at: None,
        last_run_at: None,
        last_run_key: None,
        catch_up: new.catch_up,
        created_at: now,
        updated_at: now,
    };
    job.next_run_at = next_for(&job, now)?;
    jobs(ctx).create(&job_key(&job.consumer_user_id, &id), &job).await?;
    Ok(id)
}

/// `updatePushJob` and its variants: false when the job is missing (or, with `owner`, not the
/// user's with that agent).
async fn update_job(
    ctx: &ServiceContext,
    a: UpdatePushJobArgs,
    owner: Option<(String, String)>,
) -> Result<bool, OpError> {
    for _ in 0..64 {
        let Some((key, current)) = find_job(ctx, &a.job_id).await? else { return Ok(false) };
        let mut job = current.value;
        if let Some((user, agent)) = &owner
            && (job.consumer_user_id != *user || job.agent_key.as_deref() != Some(agent.as_str()))
        {
            return Ok(false);
        }
        if let Some(v) = &a.title {
            job.title = v.clone();
        }
        if let Some(v) = &a.text {
            job.text = v.clone();
        }
        if let Some(v) = a.periodicity {
            job.periodicity = v;
        }
        if let Some(v) = &a.timezone {
            job.timezone = v.trim().to_string();
        }
        if let Some(v) = &a.schedule {
            job.schedule = schedule::normalise(v);
        }
        if let Some(v) = a.enabled {
            job.enabled = v;
        }
        if let Some(v) = a.catch_up {
            job.catch_up = v;
        }
        schedule::time_zone(&job.timezone)?;
        schedule::validate_for(job.periodicity, &job.schedule)?;
        let now = ctx.clock.now_ms();
        job.next_run_at = next_for(&job, now)?;
        job.updated_at = now;
        match jobs(ctx).update(&key, &job, current.revision).await {
            Ok(_) => return Ok(true),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Conflict { key: a.job_id.to_string() }.into())
}
