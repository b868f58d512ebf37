//! Collections filtered and paged by the database, on both backends: a page and the total
//! matching, strings compared without regard to case, booleans, and no field name spliced in.

mod common;

use cloudpc_store::{FieldEquals, Listing};
use common::{audit, backends, user};

#[tokio::test]
async fn test_users_are_filtered_and_paged_in_sql() {
    for db in backends().await {
        let store = db.open().await;
        for n in 0..30 {
            let mut u = user(n);
            u.account_enabled = n % 3 != 0;
            store.create_user(&u, None, &audit("Add user")).await.unwrap();
        }
        let (page, total) = store.list_page(Listing::Users, &[], 10, 10).await.unwrap();
        assert_eq!((page.len(), total), (10, 30), "{}", db.name);
        assert_eq!(page[0]["userPrincipalName"], "user10@contoso.com", "{}: creation order", db.name);
        let enabled = [FieldEquals { path: vec!["accountEnabled".into()], value: true.into() }];
        assert_eq!(store.list_page(Listing::Users, &enabled, 0, 100).await.unwrap().1, 20, "{}", db.name);
        let by_name = [FieldEquals { path: vec!["userPrincipalName".into()], value: "USER7@Contoso.com".into() }];
        let (found, n) = store.list_page(Listing::Users, &by_name, 0, 100).await.unwrap();
        assert_eq!((n, found[0]["displayName"].as_str()), (1, Some("User 7")), "{}", db.name);
        let hostile = [FieldEquals { path: vec!["x') OR 1=1 --".into()], value: "x".into() }];
        assert_eq!(store.list_page(Listing::Users, &hostile, 0, 100).await.unwrap().1, 0, "{}", db.name);
        assert_eq!(store.list_page(Listing::Groups, &[], 0, 100).await.unwrap().1, 0);
    }
}
