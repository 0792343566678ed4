//! The log over HTTP: the checkpoint and tiles at their C2SP `tlog-tiles` paths (so standard
//! tiled-log clients can read them), and inclusion and consistency proofs as JSON.

use crate::openapi::{ConsistencyProof, ErrorBody, InclusionProof, Tile};
use crate::query::{inclusion_proof_json, pairs};
use crate::{ApiError, SharedState, blocking};
use auditrail_core::tile::TileId;
use axum::extract::{Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;

/// `GET /log/checkpoint`
#[utoipa::path(
    get,
    path = "/log/checkpoint",
    tag = "log",
    operation_id = "log_checkpoint",
    summary = "The newest signed checkpoint",
    description = "The newest checkpoint as a C2SP signed note (tlog-checkpoint): origin, tree \
size and root hash, signed with the log's Ed25519 key.",
    responses(
        (status = 200, description = "The signed note.", body = String, content_type = "text/plain; charset=utf-8"),
        (status = 404, description = "`not_found`: no checkpoint has been published yet (the log is empty).", body = ErrorBody),
        (status = 500, description = "`internal`.", body = ErrorBody),
    )
)]
pub async fn checkpoint(State(state): State<SharedState>) -> Result<Response, ApiError> {
    if state.store.stages().published == 0 {
        return Err(ApiError::not_found("no checkpoint has been published yet (the log is empty)"));
    }
    let s = state.clone();
    let text = blocking(move || Ok(s.store.checkpoint(None)?)).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")],
        text,
    )
        .into_response())
}

/// `GET /log/tile/...`: only paths of the C2SP grammar are served, so nothing else under the
/// data directory can be reached.
#[utoipa::path(
    get,
    path = "/log/tile/{path}",
    tag = "log",
    operation_id = "log_tile",
    summary = "A tile of the Merkle tree or of its entries",
    description = "The C2SP tlog-tiles static layout, so any tiled-log client can read and \
verify the log. Full tiles never change and are cacheable for ever; partial ones (`.p/<W>`) are \
replaced by wider ones.",
    params(
        ("path" = String, Path, description = "The rest of the tile path, several segments long: `<L>/<N>[.p/<W>]` for a hash tile or `entries/<N>[.p/<W>]` for a data tile, with `<N>` in the C2SP `x001/234` form."),
    ),
    responses(
        (status = 200, description = "The tile's bytes.", body = Tile, content_type = "application/octet-stream"),
        (status = 404, description = "`not_found`: not a tile path, or no such tile (yet).", body = ErrorBody),
        (status = 500, description = "`internal`.", body = ErrorBody),
    )
)]
pub async fn tile(
    State(state): State<SharedState>,
    Path(path): Path<String>,
) -> Result<Response, ApiError> {
    let full = format!("tile/{path}");
    let id = TileId::parse(&full)
        .ok_or_else(|| ApiError::not_found(format!("{full} is not a tile path")))?;
    let s = state.clone();
    let bytes = blocking(move || match s.store.io().read(&format!("log/{}", id.path())) {
        // A tile of a coming publication can be caught while being written: it is not served
        // (a full one would be cached for good) until it holds its whole width.
        Ok(b) if whole(&id, &b) => Ok(b),
        Ok(_) => Err(ApiError::not_found(format!("{full} does not exist yet"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::not_found(format!("{full} does not exist (yet)")))
        }
        Err(e) => Err(ApiError::internal(e)),
    })
    .await?;
    // Full tiles never change; partial ones are replaced by wider ones.
    let cache = if id.is_full() { "public, max-age=31536000, immutable" } else { "no-cache" };
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream"), (header::CACHE_CONTROL, cache)],
        bytes,
    )
        .into_response())
}

/// Whether `bytes` hold all of `id`'s width: 32-byte hashes, or leaf entries of a bundle.
fn whole(id: &TileId, bytes: &[u8]) -> bool {
    match id.level {
        Some(_) => bytes.len() == id.width as usize * 32,
        None => {
            auditrail_core::tile::decode_bundle(bytes).is_some_and(|e| e.len() == id.width as usize)
        }
    }
}

fn number(param: &str, v: &str) -> Result<u64, ApiError> {
    v.parse().map_err(|_| {
        ApiError::bad_request("invalid_parameter", format!("{param}: must be a whole number"))
    })
}

/// `GET /api/v1/log/proof/inclusion?seq=&tree_size=`
#[utoipa::path(
    get,
    path = "/api/v1/log/proof/inclusion",
    tag = "log",
    operation_id = "log_inclusion_proof",
    summary = "Inclusion proof of one event",
    description = "An RFC 6962 inclusion proof of the event at `seq` in a published tree, with \
that tree's signed checkpoint.",
    params(
        ("seq" = u64, Query, description = "The event's `seq`."),
        ("tree_size" = Option<u64>, Query, description = "The size of a published tree; default the newest checkpoint's."),
    ),
    responses(
        (status = 200, description = "The proof.", body = InclusionProof),
        (status = 400, description = "`bad_query`, `invalid_parameter` (also when a given `tree_size` is not larger than `seq`), `unknown_parameter`, or `invalid_request` (the tree size is not published).", body = ErrorBody),
        (status = 409, description = "`not_yet_published`: no `tree_size` was given and `seq` is not in the newest checkpoint yet; retry in a second.", body = ErrorBody),
        (status = 500, description = "`internal`.", body = ErrorBody),
    )
)]
pub async fn inclusion(
    State(state): State<SharedState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (mut seq, mut size) = (None, None);
    for (k, v) in pairs(raw.as_deref())? {
        match k.as_str() {
            "seq" => seq = Some(number("seq", &v)?),
            "tree_size" => size = Some(number("tree_size", &v)?),
            _ => {
                return Err(ApiError::unknown_parameter(&k));
            }
        }
    }
    let seq = seq.ok_or_else(|| ApiError::bad_request("invalid_parameter", "seq: is required"))?;
    let s = state.clone();
    let body = blocking(move || inclusion_proof_json(&s, seq, size)).await?;
    Ok(axum::Json(body).into_response())
}

/// `GET /api/v1/log/proof/consistency?from=&to=`
#[utoipa::path(
    get,
    path = "/api/v1/log/proof/consistency",
    tag = "log",
    operation_id = "log_consistency_proof",
    summary = "Consistency proof between two tree sizes",
    description = "An RFC 6962 consistency proof that the published tree of size `to` extends \
the one of size `from`, with the checkpoint of `to`.",
    params(
        ("from" = u64, Query, description = "The smaller tree size."),
        ("to" = Option<u64>, Query, description = "The larger tree size, published; default the newest checkpoint's."),
    ),
    responses(
        (status = 200, description = "The proof.", body = ConsistencyProof),
        (status = 400, description = "`bad_query`, `invalid_parameter`, `unknown_parameter`, or `invalid_request` (a size is not published, or `from` exceeds `to`).", body = ErrorBody),
        (status = 500, description = "`internal`.", body = ErrorBody),
    )
)]
pub async fn consistency(
    State(state): State<SharedState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (mut from, mut to) = (None, None);
    for (k, v) in pairs(raw.as_deref())? {
        match k.as_str() {
            "from" => from = Some(number("from", &v)?),
            "to" => to = Some(number("to", &v)?),
            _ => {
                return Err(ApiError::unknown_parameter(&k));
            }
        }
    }
    let from =
        from.ok_or_else(|| ApiError::bad_request("invalid_parameter", "from: is required"))?;
    let s = state.clone();
    let body = blocking(move || {
        let to = to.unwrap_or(s.store.stages().published);
        let hashes = s.store.consistency_proof(from, to)?;
        let b64 = |h: &[u8]| base64::engine::general_purpose::STANDARD.encode(h);
        Ok(json!({
            "from": from,
            "to": to,
            "hashes": hashes.iter().map(|h| b64(h)).collect::<Vec<_>>(),
            "checkpoint": s.store.checkpoint(Some(to))?,
        }))
    })
    .await?;
    Ok(axum::Json(body).into_response())
}
