//! gRPC plumbing shared by both binaries: one listener serving `grpc.health.v1`, server
//! reflection (v1 and v1alpha: grpcurl 1.8 speaks only v1alpha) and any extra services,
//! until a shutdown signal.

use std::future::Future;

use tonic::service::Routes;
use tracing::error;

/// Serves `health`, reflection over `descriptor_sets` (plus the health protocol's own),
/// and `extra` on `listener` until `shutdown` resolves. Errors are logged.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    descriptor_sets: &[&[u8]],
    extra: Option<Routes>,
    shutdown: impl Future<Output = ()>,
) {
    let reflection = || {
        descriptor_sets.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, fds| b.register_encoded_file_descriptor_set(fds),
        )
    };
    let (v1, v1alpha) = match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "cannot build the reflection service; the embedded descriptors are broken (a build bug)");
            return;
        }
    };
    let routes = extra
        .unwrap_or_default()
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha)
        .prepare();
    let result = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    if let Err(e) = result {
        error!(error = %e, "gRPC server failed");
    }
}
