//! The generated gRPC code for `proto/auction/v1`, and its encoded descriptor set for
//! server reflection. Generated once by `build.rs`; nothing else includes generated files.

#![allow(
    missing_docs,
    clippy::doc_lazy_continuation,
    clippy::large_enum_variant
)]

/// `auction.v1`: messages, the `AuctionAdmin` server trait and client.
pub mod v1 {
    tonic::include_proto!("auction.v1");
}

/// Encoded `FileDescriptorSet` of our protos, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/auction_descriptor.bin"));
