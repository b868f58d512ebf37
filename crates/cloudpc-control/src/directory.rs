//! Users, groups and membership.
//!
//! A user is addressed by id or by userPrincipalName, as in Graph. Membership changes are checked
//! against group-based licenses: adding someone to a licensed group is refused when the SKU has
//! no seat left for them (the store checks this in the same transaction).

use chrono::Utc;
use uuid::Uuid;

use cloudpc_types::audit::AuditOperationType;
use cloudpc_types::directory::{Group, GroupCreate, GroupUpdate, User, UserCreate, UserUpdate};

use crate::audit::{property, Actor, Change};
use crate::error::reference;
use crate::{App, Error, Result};

fn user_change(activity: &str, op: AuditOperationType, user: &User) -> Change<'static> {
    Change {
        component: "Directory",
        activity: format!("{activity} User"),
        operation: op,
        resource_type: "user",
        resource_id: user.id.to_string(),
        resource_name: user.user_principal_name.clone(),
    }
}

fn group_change(activity: &str, op: AuditOperationType, group: &Group) -> Change<'static> {
    Change {
        component: "Directory",
        activity: format!("{activity} Group"),
        operation: op,
        resource_type: "group",
        resource_id: group.id.to_string(),
        resource_name: group.display_name.clone(),
    }
}

impl App {
    pub async fn list_users(&self) -> Result<Vec<User>> {
        Ok(self.store.list_users().await?)
    }

    /// Finds a user by id or, as Graph allows, by userPrincipalName.
    pub async fn get_user(&self, id_or_upn: &str) -> Result<User> {
        match Uuid::parse_str(id_or_upn) {
            Ok(id) => Ok(self.store.get_user(id).await?),
            Err(_) => Ok(self.store.find_user_by_upn(id_or_upn).await?),
        }
    }

    pub async fn create_user(&self, actor: &Actor, input: UserCreate) -> Result<User> {
        // The default nickname keeps only the characters a nickname may have.
        let nickname = input.mail_nickname.unwrap_or_else(|| {
            let n: String = User::local_part(&input.user_principal_name)
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .take(64)
                .collect();
            if n.is_empty() {
                "user".into()
            } else {
                n
            }
        });
        let user = User {
            row_version: 0,
            id: Uuid::new_v4(),
            user_principal_name: input.user_principal_name,
            display_name: input.display_name,
            mail: input.mail,
            mail_nickname: nickname,
            account_enabled: input.account_enabled.unwrap_or(true),
            created_date_time: Utc::now(),
            given_name: None,
            surname: None,
            identity_provider_id: None,
            external_id: None,
        };
        user.validate()?;
        let hash = match &input.password_profile {
            Some(p) => {
                let password = p.password.clone();
                Some(self.hash_work(move || crate::portal::hash_password(&password)).await??)
            }
            None => None,
        };
        let audit = user_change("Create", AuditOperationType::Create, &user).event(actor, None, Some(&user));
        self.store.create_user(&user, hash.as_deref(), &audit).await?;
        Ok(user)
    }

    pub async fn update_user(&self, actor: &Actor, id: &str, input: UserUpdate) -> Result<User> {
        let before = self.get_user(id).await?;
        self.check_managed(actor, before.identity_provider_id, &format!("the user '{}'", before.user_principal_name))
            .await?;
        let mut user = before.clone();
        let hash = match &input.password_profile {
            Some(p) => {
                let password = p.password.clone();
                Some(self.hash_work(move || crate::portal::hash_password(&password)).await??)
            }
            None => None,
        };
        if let Some(v) = input.user_principal_name {
            user.user_principal_name = v;
        }
        if let Some(v) = input.display_name {
            user.display_name = v;
        }
        if let Some(v) = input.mail {
            user.mail = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = input.mail_nickname {
            user.mail_nickname = v;
        }
        if let Some(v) = input.account_enabled {
            user.account_enabled = v;
        }
        user.validate()?;
        let mut audit =
            user_change("Update", AuditOperationType::Patch, &user).event(actor, Some(&before), Some(&user));
        if hash.is_some() {
            audit.resources[0].modified_properties.push(property("passwordProfile", None, Some("(changed)".into())));
        }
        self.store.update_user(&user, hash.as_deref(), &audit).await?;
        if !user.account_enabled {
            self.end_access_of_user(user.id).await;
        }
        self.changed();
        Ok(user)
    }

    pub async fn delete_user(&self, actor: &Actor, id: &str) -> Result<()> {
        let user = self.get_user(id).await?;
        let audit = user_change("Delete", AuditOperationType::Delete, &user).event(actor, Some(&user), None);
        self.check_managed(actor, user.identity_provider_id, &format!("the user '{}'", user.user_principal_name))
            .await?;
        self.close_consoles_of_user(user.id).await;
        self.store.delete_user(user.id, &audit).await?;
        self.changed();
        Ok(())
    }

    pub async fn list_groups(&self) -> Result<Vec<Group>> {
        Ok(self.store.list_groups().await?)
    }

    pub async fn get_group(&self, id: &str) -> Result<Group> {
        Ok(self.store.get_group(parse_id("group", id)?).await?)
    }

    pub async fn create_group(&self, actor: &Actor, input: GroupCreate) -> Result<Group> {
        if input.mail_enabled == Some(true) {
            return Err(Error::invalid(
                "mailEnabled",
                "cloudpc has no mail; only security groups (mailEnabled false) exist",
            ));
        }
        if input.security_enabled == Some(false) {
            return Err(Error::invalid(
                "securityEnabled",
                "must be true: provisioning policies target security groups",
            ));
        }
        let group = Group {
            row_version: 0,
            id: Uuid::new_v4(),
            display_name: input.display_name,
            description: input.description,
            mail_nickname: input.mail_nickname,
            security_enabled: true,
            mail_enabled: false,
            created_date_time: Utc::now(),
            identity_provider_id: None,
            external_id: None,
        };
        group.validate()?;
        let audit = group_change("Create", AuditOperationType::Create, &group).event(actor, None, Some(&group));
        self.store.create_group(&group, &audit).await?;
        Ok(group)
    }

    pub async fn update_group(&self, actor: &Actor, id: &str, input: GroupUpdate) -> Result<Group> {
        let before = self.get_group(id).await?;
        self.check_managed(actor, before.identity_provider_id, &format!("the group '{}'", before.display_name)).await?;
        let mut group = before.clone();
        if let Some(v) = input.display_name {
            group.display_name = v;
        }
        if let Some(v) = input.description {
            group.description = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = input.mail_nickname {
            group.mail_nickname = (!v.is_empty()).then_some(v);
        }
        group.validate()?;
        let audit = group_change("Update", AuditOperationType::Patch, &group).event(actor, Some(&before), Some(&group));
        self.store.update_group(&group, &audit).await?;
        Ok(group)
    }

    pub async fn delete_group(&self, actor: &Actor, id: &str) -> Result<()> {
        let group = self.get_group(id).await?;
        self.check_managed(actor, group.identity_provider_id, &format!("the group '{}'", group.display_name)).await?;
        let audit = group_change("Delete", AuditOperationType::Delete, &group).event(actor, Some(&group), None);
        self.store.delete_group(group.id, &audit).await?;
        self.changed();
        Ok(())
    }

    pub async fn list_members(&self, group: &str) -> Result<Vec<User>> {
        Ok(self.store.list_members(parse_id("group", group)?).await?)
    }

    pub async fn list_member_of(&self, user: &str) -> Result<Vec<Group>> {
        let user = self.get_user(user).await?;
        Ok(self.store.list_groups_of_user(user.id).await?)
    }

    pub async fn add_member(&self, actor: &Actor, group: &str, member: Uuid) -> Result<()> {
        let group = self.get_group(group).await?;
        self.check_managed(
            actor,
            group.identity_provider_id,
            &format!("the members of group '{}'", group.display_name),
        )
        .await?;
        let user = self.store.get_user(member).await.map_err(Error::from).map_err(reference("@odata.id"))?;
        let audit = group_change("Add member to", AuditOperationType::Patch, &group)
            .event_with(actor, vec![property("members", None, Some(user.user_principal_name.clone()))]);
        self.store.add_member(group.id, user.id, &audit).await?;
        self.changed();
        Ok(())
    }

    pub async fn remove_member(&self, actor: &Actor, group: &str, member: &str) -> Result<()> {
        let group = self.get_group(group).await?;
        self.check_managed(
            actor,
            group.identity_provider_id,
            &format!("the members of group '{}'", group.display_name),
        )
        .await?;
        let user = self.get_user(member).await?;
        let audit = group_change("Remove member from", AuditOperationType::Patch, &group)
            .event_with(actor, vec![property("members", Some(user.user_principal_name.clone()), None)]);
        self.store.remove_member(group.id, user.id, &audit).await?;
        self.changed();
        Ok(())
    }
}

impl App {
    /// A disabled or deleted user loses access at once: portal sessions end, console tickets
    /// are refused, open consoles close.
    pub(crate) async fn end_access_of_user(&self, user: Uuid) {
        if let Err(e) = self.store.end_sessions_of_user(user).await {
            tracing::warn!(error = %e, "could not end a disabled user's sessions; they are refused anyway");
        }
        self.close_consoles_of_user(user).await;
    }
}

/// Parses an id from a URL; a malformed one is "not found", as Graph answers.
pub(crate) fn parse_id(kind: &'static str, id: &str) -> Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| Error::NotFound { kind, id: id.to_string() })
}
