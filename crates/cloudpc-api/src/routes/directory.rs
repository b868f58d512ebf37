//! `/users`, `/groups` and group membership.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::Router;

use cloudpc_control::{App, Listing};
use cloudpc_types::directory::{Group, GroupCreate, GroupUpdate, MemberRef, User, UserCreate, UserUpdate};

use super::{no_content, Reply};
use crate::extract::{ApiJson, ApiPath};
use crate::odata::{Collection, GraphRequest};
use crate::Caller;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/users", get(list_users).post(create_user))
        .route("/users/{id}", get(get_user).patch(update_user).delete(delete_user))
        .route("/users/{id}/memberOf", get(member_of))
        .route("/groups", get(list_groups).post(create_group))
        .route("/groups/{id}", get(get_group).patch(update_group).delete(delete_group))
        .route("/groups/{id}/members", get(list_members))
        .route("/groups/{id}/members/$ref", post(add_member))
        .route("/groups/{id}/members/{member}/$ref", delete(remove_member))
}

#[utoipa::path(get, path = "/v1.0/users", tag = "directory", responses((status = 200, body = Collection<User>)))]
pub async fn list_users(State(app): State<App>, g: GraphRequest) -> Reply {
    g.stored_page::<User>(&app, "users", Listing::Users).await
}

#[utoipa::path(post, path = "/v1.0/users", tag = "directory", request_body = UserCreate, responses((status = 201, body = User), (status = 409, description = "A user with this userPrincipalName exists.")))]
pub async fn create_user(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<UserCreate>,
) -> Reply {
    g.entity("users", &app.create_user(&actor, input).await?, StatusCode::CREATED)
}

#[utoipa::path(get, path = "/v1.0/users/{id}", tag = "directory", params(("id" = String, Path, description = "id or userPrincipalName")), responses((status = 200, body = User)))]
pub async fn get_user(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity("users", &app.get_user(&id).await?, StatusCode::OK)
}

#[utoipa::path(patch, path = "/v1.0/users/{id}", tag = "directory", request_body = UserUpdate, responses((status = 204), (status = 409, description = "A user with this userPrincipalName exists.")))]
pub async fn update_user(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<UserUpdate>,
) -> Reply {
    app.update_user(&actor, &id, input).await?;
    no_content()
}

#[utoipa::path(delete, path = "/v1.0/users/{id}", tag = "directory", responses((status = 204)))]
pub async fn delete_user(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.delete_user(&actor, &id).await?;
    no_content()
}

#[utoipa::path(get, path = "/v1.0/users/{id}/memberOf", tag = "directory", responses((status = 200, body = Collection<Group>)))]
pub async fn member_of(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.page("directoryObjects", app.list_member_of(&id).await?)
}

#[utoipa::path(get, path = "/v1.0/groups", tag = "directory", responses((status = 200, body = Collection<Group>)))]
pub async fn list_groups(State(app): State<App>, g: GraphRequest) -> Reply {
    g.stored_page::<Group>(&app, "groups", Listing::Groups).await
}

#[utoipa::path(post, path = "/v1.0/groups", tag = "directory", request_body = GroupCreate, responses((status = 201, body = Group)))]
pub async fn create_group(
    State(app): State<App>,
    Caller(actor): Caller,
    g: GraphRequest,
    ApiJson(input): ApiJson<GroupCreate>,
) -> Reply {
    g.entity("groups", &app.create_group(&actor, input).await?, StatusCode::CREATED)
}

#[utoipa::path(get, path = "/v1.0/groups/{id}", tag = "directory", responses((status = 200, body = Group)))]
pub async fn get_group(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.entity("groups", &app.get_group(&id).await?, StatusCode::OK)
}

#[utoipa::path(patch, path = "/v1.0/groups/{id}", tag = "directory", request_body = GroupUpdate, responses((status = 204)))]
pub async fn update_group(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<GroupUpdate>,
) -> Reply {
    app.update_group(&actor, &id, input).await?;
    no_content()
}

#[utoipa::path(delete, path = "/v1.0/groups/{id}", tag = "directory", responses((status = 204), (status = 409, description = "a policy targets the group")))]
pub async fn delete_group(State(app): State<App>, Caller(actor): Caller, ApiPath(id): ApiPath<String>) -> Reply {
    app.delete_group(&actor, &id).await?;
    no_content()
}

#[utoipa::path(get, path = "/v1.0/groups/{id}/members", tag = "directory", responses((status = 200, body = Collection<User>)))]
pub async fn list_members(State(app): State<App>, g: GraphRequest, ApiPath(id): ApiPath<String>) -> Reply {
    g.page("directoryObjects", app.list_members(&id).await?)
}

#[utoipa::path(post, path = "/v1.0/groups/{id}/members/$ref", tag = "directory", request_body = MemberRef, responses((status = 204), (status = 409, description = "already a member, or no seat left on a group license")))]
pub async fn add_member(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(input): ApiJson<MemberRef>,
) -> Reply {
    let member = input.member_id().map_err(cloudpc_control::Error::from)?;
    app.add_member(&actor, &id, member).await?;
    no_content()
}

#[utoipa::path(delete, path = "/v1.0/groups/{id}/members/{member}/$ref", tag = "directory", responses((status = 204)))]
pub async fn remove_member(
    State(app): State<App>,
    Caller(actor): Caller,
    ApiPath((id, member)): ApiPath<(String, String)>,
) -> Reply {
    app.remove_member(&actor, &id, &member).await?;
    no_content()
}
