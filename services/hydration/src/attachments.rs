//! (in progress)

use common::ops::OpRegistry;
use common::service::ServiceContext;

pub(crate) fn register(_ctx: &ServiceContext, _ops: &mut OpRegistry) {}
