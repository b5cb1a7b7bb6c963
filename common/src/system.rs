//! Stack-wide operations that belong to no single domain: the manual test clock.

pub use crate::api::system::{AdvanceTestClockArgs, ClockView, SetTestClockArgs};
use crate::clock::{ManualTime, test_clock_disabled};
use crate::error::OpError;
use crate::service::{ServiceContext, TEST_CLOCK_KEY, TestClockRecord};

pub fn get_test_clock(ctx: &ServiceContext) -> ClockView {
    ClockView { mode: if ctx.clock.is_manual() { "manual" } else { "system" }.to_string(), now_ms: ctx.clock.now_ms() }
}

/// Sets the manual clock of the whole stack; earlier instants are allowed.
pub async fn set_test_clock(ctx: &ServiceContext, args: SetTestClockArgs) -> Result<ClockView, OpError> {
    if args.now_ms < 0 {
        return Err(OpError::invalid("nowMs must not be negative"));
    }
    move_clock(ctx, |_| args.now_ms).await
}

/// Moves the manual clock of the whole stack forward by `ms`.
pub async fn advance_test_clock(ctx: &ServiceContext, args: AdvanceTestClockArgs) -> Result<ClockView, OpError> {
    if args.ms < 0 {
        return Err(OpError::invalid("ms must not be negative; use setTestClock to go back in time"));
    }
    move_clock(ctx, |now| now.saturating_add(args.ms)).await
}

async fn move_clock(ctx: &ServiceContext, next: impl Fn(i64) -> i64) -> Result<ClockView, OpError> {
    if !ctx.clock.is_manual() {
        return Err(test_clock_disabled());
    }
    let written = ctx
        .buckets
        .system
        .modify::<TestClockRecord, OpError, _>(TEST_CLOCK_KEY, |current| {
            let now = current.map(|c| c.now_ms).unwrap_or_else(|| ctx.clock.now_ms());
            Ok(Some(TestClockRecord { now_ms: next(now) }))
        })
        .await?
        .ok_or_else(|| OpError::internal("test clock write returned nothing"))?;
    // Apply locally at once; the watch delivers the same revision later and is ignored.
    ctx.clock.apply_manual(ManualTime { now_ms: written.value.now_ms, revision: written.revision })?;
    Ok(get_test_clock(ctx))
}
