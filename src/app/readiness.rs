//! Health: NOT_SERVING until the store is migrated and the bootstrap operator exists, then
//! KeyAdmin's health follows the store's reachability.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use super::{AUTHORIZER_SERVICE, KEY_ADMIN_SERVICE, Services, StartupError};
use crate::{admin::AdminError, grpc::reflection::ENVOY_AUTHORIZATION_SERVICE, settings::Settings};

/// Reports `status` for the whole server and for each service it can serve.
pub(super) async fn set_every_service(health: &HealthReporter, status: ServingStatus) {
    for service in [
        "",
        AUTHORIZER_SERVICE,
        ENVOY_AUTHORIZATION_SERVICE,
        KEY_ADMIN_SERVICE,
    ] {
        health.set_service_status(service, status).await;
    }
}

/// Migrates (retrying until the database answers), creates the bootstrap user, reports
/// SERVING, then keeps KeyAdmin's health in step with the store's reachability.
pub(super) async fn readiness(
    services: Arc<Services>,
    settings: Settings,
    health: HealthReporter,
    mut stopping: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match prepare_store(&services, &settings).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "store not ready");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopping.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    if *stopping.borrow() {
        return;
    }
    set_every_service(&health, ServingStatus::Serving).await;
    tracing::info!(store = %services.store.describe(), "store ready; serving");
    // While the store is unreachable, Authorize keeps answering from its cache, so the process
    // stays SERVING; only KeyAdmin, which needs the store for every call, reports NOT_SERVING.
    let mut store_up = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopping.changed() => return,
        }
        let up = services.store.ping().await.is_ok();
        if up != store_up && !*stopping.borrow() {
            store_up = up;
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(KEY_ADMIN_SERVICE, status).await;
            if up {
                tracing::info!("store reachable again");
            } else {
                tracing::warn!(
                    "store unreachable: serving Authorize from cache, KeyAdmin NOT_SERVING"
                );
            }
        }
    }
}

async fn prepare_store(services: &Services, settings: &Settings) -> Result<(), StartupError> {
    services.store.migrate().await?;
    if let Some(operator) = &settings.bootstrap_operator {
        let user = &operator.username;
        match services.operators.bootstrap(user, &operator.password).await {
            Ok(true) => tracing::info!(user, "created the bootstrap operator"),
            Ok(false) => {}
            Err(AdminError::Unavailable(error) | AdminError::Internal(error)) => {
                return Err(error.into());
            }
            Err(error) => {
                tracing::error!(%error, "cannot create the bootstrap operator from KEYGATE_ADMIN_USER")
            }
        }
    }
    Ok(())
}
