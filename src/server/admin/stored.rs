//! Reading stored auctions for the admin API, with Redis failures answered `UNAVAILABLE`
//! (retryable) and a missing auction `NOT_FOUND`.

use std::time::Duration;

use tonic::Status;

use super::messages::unavailable;
use crate::keyspace::AuctionId;
use crate::link::sentinel::Master;
use crate::store::ledger::{self, AuctionRecord};

/// A connection to the current master, or `UNAVAILABLE`.
pub(super) async fn conn(master: &Master) -> Result<redis::aio::MultiplexedConnection, Status> {
    let link = master
        .link(Duration::from_secs(1))
        .await
        .map_err(unavailable)?;
    Ok(link.conn)
}

/// The stored auction `id`.
pub(super) async fn read(master: &Master, id: &AuctionId) -> Result<AuctionRecord, Status> {
    let mut conn = conn(master).await?;
    ledger::get(&mut conn, id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| Status::not_found(format!("no auction {id}")))
}
