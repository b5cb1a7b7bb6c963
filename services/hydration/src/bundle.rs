//! (in progress)

use common::ops::OpRegistry;
use common::service::ServiceContext;

pub(crate) fn register(_ctx: &ServiceContext, _cipher: std::sync::Arc<common::crypto::SecretCipher>, _ops: &mut OpRegistry) {}
