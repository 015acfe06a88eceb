//! Getting a key by enrolling (`ENROLL_TOKEN`): once the server is SERVING, the bidder asks
//! it for a key of its own name (`EnrollBidder`) and signs every bid with that key. Refusals
//! that time can mend (the server not reachable yet, the bidder's DNS record not published or
//! still naming its previous address) are retried with backoff; the ones that need an
//! operator (a wrong token, enrollment off, a name that cannot enroll) stop the bidder with
//! the server's reason.

use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tracing::{info, warn};

use crate::bidder::args::check_key;
use crate::proto::v1 as pb;
use crate::proto::v1::auction_admin_client::AuctionAdminClient;
use crate::runtime::backoff::Backoff;

/// Each call's bound.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Enrolls `me` with `token`, retrying what time can mend; the key, or why it cannot be had.
pub async fn enroll(
    mut admin: AuctionAdminClient<Channel>,
    me: &str,
    token: &str,
    mut server_up: watch::Receiver<bool>,
) -> anyhow::Result<String> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        // The sender lives as long as the bidder; if it is gone, the bidder is stopping.
        if server_up.wait_for(|up| *up).await.is_err() {
            anyhow::bail!("the server health watch stopped before enrollment");
        }
        let mut req = Request::new(pb::EnrollBidderRequest { bidder: me.into() });
        req.set_timeout(CALL_TIMEOUT);
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow::anyhow!("ENROLL_TOKEN cannot be sent as gRPC metadata"))?;
        req.metadata_mut().insert("authorization", bearer);
        match admin.enroll_bidder(req).await {
            Ok(reply) => {
                let key = reply.into_inner().key;
                check_key(&key).map_err(|e| {
                    anyhow::anyhow!("EnrollBidder answered a key that cannot be used: {e}")
                })?;
                info!(bidder = %me, attempts = backoff.attempts() + 1, "enrolled: bids are signed with this bidder's own key");
                return Ok(key);
            }
            Err(status) if retryable(status.code()) => {
                let wait = backoff.next_delay();
                warn!(bidder = %me, code = ?status.code(), reason = status.message(), retry_in = ?wait, "enrollment not granted yet; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(status) => anyhow::bail!(
                "enrollment refused ({:?}): {}",
                status.code(),
                status.message()
            ),
        }
    }
}

/// Whether time can mend a refusal: the server or the name lookup not reachable yet, or the
/// bidder's DNS record still naming an earlier address (`PERMISSION_DENIED`, after a restart).
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::PermissionDenied
            | Code::Unknown
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_operator_must_fix_is_not_retried() {
        for code in [
            Code::Unauthenticated,
            Code::FailedPrecondition,
            Code::InvalidArgument,
            Code::Unimplemented,
        ] {
            assert!(!retryable(code), "{code:?}");
        }
        assert!(retryable(Code::Unavailable));
        assert!(retryable(Code::PermissionDenied));
    }
}
