//! `/api/v1/instances`.

use super::*;

pub(super) async fn list_instances(
    State(state): State<ApiState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> ApiResult<Json<List<Instance>>> {
    let sel = selector(&query)?;
    let service = query.get("service");
    let (items, rev) = typed::list::<Instance>(&*state.store).await?;
    Ok(Json(List {
        items: items
            .into_iter()
            .filter(|i| service.is_none_or(|s| &i.spec.service == s))
            .filter(|i| sel.matches(&i.metadata.labels))
            .collect(),
        resource_version: rev,
    }))
}
