//! The HTTP API: `POST /order` decrements an item's stock under the item's
//! lock and writes it fenced by the lock's token; `POST /stock` sets an
//! item's stock the same way; `GET /stock/{item}` reads it.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use distlock::{LockGuard, LockOptions, Locker};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::{Store, WriteOutcome};

/// The longest item name.
const MAX_ITEM_NAME: usize = 64;
/// The largest quantity of one order.
const MAX_QUANTITY: u32 = 1_000;

/// What every request handler shares.
pub struct App {
    /// The lock service (any distlock URL).
    pub locks: Locker,
    /// How the item locks are taken: a bounded wait, a TTL renewed while
    /// an order is handled.
    pub options: LockOptions,
    /// Lock keys are `<prefix>/stock/<item>`.
    pub prefix: String,
    /// The shared stock store.
    pub store: Store,
    /// This replica's address, in every answer, to see who served what.
    pub replica: String,
}

/// The routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/order", post(place_order))
        .route("/stock", post(set_stock))
        .route("/stock/{item}", get(read_stock))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(app)
}

/// `POST /order`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Order {
    item_name: String,
    quantity: u32,
}

/// `POST /stock`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStock {
    item_name: String,
    stock: u32,
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": kind, "message": message.into() })),
    )
        .into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// Item names are plain (`[A-Za-z0-9_-]`, at most 64 bytes): they are part
/// of lock keys and store keys.
/// The 400 answer for a bad item name, if it is one.
fn check_item_name(name: &str) -> Option<Response> {
    if name.is_empty() || name.len() > MAX_ITEM_NAME {
        return Some(bad_request(format!(
            "item_name must be 1 to {MAX_ITEM_NAME} characters"
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Some(bad_request(
            "item_name may hold only letters, digits, '-' and '_'",
        ));
    }
    None
}

impl App {
    /// Takes the item's lock within the bounded wait.
    async fn lock_item(&self, item: &str) -> distlock::Result<LockGuard> {
        let key = format!("{}/stock/{item}", self.prefix);
        let locked = self.locks.lock(&key, &self.options).await;
        if let Err(err) = &locked {
            tracing::warn!(%key, error = %distlock::error::describe(err), "no lock");
        }
        locked
    }

    /// The answer once the work under `guard` is done, after releasing it.
    /// A failed release does not undo a write the store accepted.
    async fn release(&self, guard: LockGuard, answer: Response) -> Response {
        let key = guard.key().to_owned();
        if let Err(err) = guard.release().await {
            tracing::warn!(%key, error = %distlock::error::describe(&err), "release failed");
        }
        answer
    }

    fn ok(&self, mut body: Value) -> Response {
        body["replica"] = json!(self.replica);
        (StatusCode::OK, Json(body)).into_response()
    }
}

/// 503: the lock was not had within the wait (`busy`), or the lock
/// service failed.
fn no_lock(err: &distlock::Error) -> Response {
    let kind = if err.is_timeout() {
        "busy"
    } else {
        "lock_unavailable"
    };
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        kind,
        distlock::error::describe(err),
    )
}

fn store_failed(err: &crate::store::StoreError) -> Response {
    tracing::warn!(error = %err, "store failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        err.to_string(),
    )
}

fn stale(item: &str, token: u64, highest: &str) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "stale_write",
        format!(
            "the store refused the write of {item}: this replica's lock (token {token}) ended and a newer holder (token {highest}) wrote; the order was not placed"
        ),
    )
}

async fn place_order(
    State(app): State<Arc<App>>,
    body: Result<Json<Order>, JsonRejection>,
) -> Response {
    let order = match body {
        Ok(Json(order)) => order,
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    if let Some(answer) = check_item_name(&order.item_name) {
        return answer;
    }
    if order.quantity == 0 || order.quantity > MAX_QUANTITY {
        return bad_request(format!("quantity must be 1 to {MAX_QUANTITY}"));
    }
    let item = order.item_name.as_str();
    let guard = match app.lock_item(item).await {
        Ok(guard) => guard,
        Err(err) => return no_lock(&err),
    };
    let token = guard.fencing_token();
    // Read, decide, write: safe only because the lock serialises the
    // replicas, and the fenced write refuses a holder whose lock ended.
    let answer = match app.store.stock(item).await {
        Err(err) => store_failed(&err),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_item",
            format!("no stock of {item}"),
        ),
        Ok(Some(stock)) if stock < i64::from(order.quantity) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": "out_of_stock",
                "message": format!("{item}: {stock} left, {} ordered", order.quantity),
                "remaining": stock,
            })),
        )
            .into_response(),
        Ok(Some(stock)) => {
            let remaining = stock - i64::from(order.quantity);
            match app
                .store
                .write_stock(item, token, Some(stock), remaining)
                .await
            {
                Err(err) => store_failed(&err),
                Ok(WriteOutcome::Stale { highest }) => stale(item, token, &highest),
                Ok(WriteOutcome::Written) => app.ok(json!({
                    "item_name": item,
                    "quantity": order.quantity,
                    "remaining": remaining,
                    "fencing_token": token,
                })),
            }
        }
    };
    app.release(guard, answer).await
}

async fn set_stock(
    State(app): State<Arc<App>>,
    body: Result<Json<SetStock>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(request)) => request,
        Err(rejection) => return bad_request(rejection.body_text()),
    };
    if let Some(answer) = check_item_name(&request.item_name) {
        return answer;
    }
    let item = request.item_name.as_str();
    let guard = match app.lock_item(item).await {
        Ok(guard) => guard,
        Err(err) => return no_lock(&err),
    };
    let token = guard.fencing_token();
    let read = app.store.stock(item).await;
    let answer = match read {
        Err(err) => store_failed(&err),
        Ok(read) => match app
            .store
            .write_stock(item, token, read, i64::from(request.stock))
            .await
        {
            Err(err) => store_failed(&err),
            Ok(WriteOutcome::Stale { highest }) => stale(item, token, &highest),
            Ok(WriteOutcome::Written) => app.ok(json!({
                "item_name": item,
                "stock": request.stock,
                "fencing_token": token,
            })),
        },
    };
    app.release(guard, answer).await
}

async fn read_stock(State(app): State<Arc<App>>, Path(item): Path<String>) -> Response {
    if let Some(answer) = check_item_name(&item) {
        return answer;
    }
    match app.store.stock(&item).await {
        Err(err) => store_failed(&err),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_item",
            format!("no stock of {item}"),
        ),
        Ok(Some(stock)) => app.ok(json!({ "item_name": item, "stock": stock })),
    }
}
