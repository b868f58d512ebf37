//! The command line: every flag says what it does in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "cloudpc",
    version,
    about = "Self-hosted Cloud PCs: the control-plane server and its admin command line."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Base URL of the cloudpc server.
    #[arg(long, global = true, env = "CLOUDPC_URL", default_value = "http://127.0.0.1:7365")]
    pub url: String,
    /// Bearer token (an administrator's or a reader's). Prefer the environment variable over the flag,
    /// so the token does not show up in the process list.
    #[arg(long, global = true, env = "CLOUDPC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output for people (table) or for scripts (json: the API's own JSON).
    #[arg(long, short, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the control-plane server.
    Server(Box<ServerArgs>),
    /// Run the agent of a hypervisor host: joins the control plane once with a token, then
    /// serves it over mutual TLS and drives the local libvirt/QEMU.
    HostAgent(Box<HostAgentArgs>),
    /// Hypervisor hosts: list, show, maintenance, drain, join tokens.
    #[command(subcommand)]
    Hosts(HostsCmd),
    /// The organisation's identity providers: OpenID Connect sign-in, roles from their groups,
    /// SCIM tokens.
    #[command(subcommand)]
    IdentityProviders(IdpCmd),
    /// Network connections to the organisation's network and Active Directory domain
    /// (onPremisesConnections).
    #[command(subcommand)]
    NetworkConnections(NetCmd),
    /// Directory users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Directory groups and their members.
    #[command(subcommand)]
    Groups(GroupsCmd),
    /// License SKUs (hardware size and seats).
    #[command(subcommand)]
    Skus(SkusCmd),
    /// Gallery and custom images.
    #[command(subcommand)]
    Images(ImagesCmd),
    /// Provisioning policies and their group assignments.
    #[command(subcommand)]
    Policies(PoliciesCmd),
    /// Cloud PCs.
    #[command(subcommand, name = "cloudpcs")]
    CloudPcs(CloudPcsCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// API tokens.
    #[command(subcommand)]
    Tokens(TokensCmd),
}

#[derive(Args)]
pub struct ServerArgs {
    /// TOML file with settings (keys: listen, data_dir, max_image_size_gb, qemu_img, log).
    /// Flags win over environment variables, which win over the file.
    #[arg(long, env = "CLOUDPC_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address and port to listen on [default: 127.0.0.1:7365]. Port 0 picks a free port.
    #[arg(long, env = "CLOUDPC_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database and other state; created if missing; QEMU's user must be able to reach it [default: /var/lib/cloudpc/data].
    #[arg(long, env = "CLOUDPC_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL database to keep state in (postgres://user:password@host:port/database), for
    /// several replicas sharing one database [default: SQLite in DATA_DIR/cloudpc.db].
    #[arg(long, env = "CLOUDPC_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Largest virtual disk size accepted for a custom image, in GiB [default: 256].
    #[arg(long, env = "CLOUDPC_MAX_IMAGE_SIZE_GB")]
    pub max_image_size_gb: Option<u64>,
    /// The qemu-img program used to check imported images [default: qemu-img].
    #[arg(long, env = "CLOUDPC_QEMU_IMG")]
    pub qemu_img: Option<String>,
    /// MiB that image uploads and copies must leave free on the data directory's file system,
    /// for the Cloud PCs' disks [default: 2048].
    #[arg(long, env = "CLOUDPC_IMAGE_FREE_SPACE_RESERVE_MIB")]
    pub image_free_space_reserve_mib: Option<u64>,
    /// Log filter, for example info or cloudpc=debug [default: info].
    #[arg(long, env = "CLOUDPC_LOG")]
    pub log: Option<String>,
    /// Directory of gallery images (one sub-directory with a manifest.json per image)
    /// [default: DATA_DIR/gallery].
    #[arg(long, env = "CLOUDPC_GALLERY_DIR")]
    pub gallery_dir: Option<PathBuf>,
    /// libvirt URI of the local hypervisor host [default: qemu:///system]; hosts can also be
    /// listed in the config file as [[hosts]] tables (name, uri, region, vcpus, memory_mib, disk_gib).
    #[arg(long, env = "CLOUDPC_LIBVIRT_URI")]
    pub libvirt_uri: Option<String>,
    /// Region of the local host [default: local].
    #[arg(long, env = "CLOUDPC_REGION")]
    pub region: Option<String>,
    /// Grace period in hours before a Cloud PC that lost its license or targeting is
    /// deprovisioned (policies may set their own) [default: 168].
    #[arg(long, env = "CLOUDPC_GRACE_PERIOD_HOURS")]
    pub grace_period_hours: Option<f64>,
    /// Seconds between a failure or deprovision and clean-up [default: 10800, three hours].
    #[arg(long, env = "CLOUDPC_CLEANUP_DELAY_SECS")]
    pub cleanup_delay_secs: Option<u64>,
    /// Seconds between full reconciler passes [default: 10].
    #[arg(long, env = "CLOUDPC_RESYNC_SECS")]
    pub resync_secs: Option<u64>,
    /// Prefix of the libvirt domains cloudpc creates [default: cloudpc-].
    #[arg(long, env = "CLOUDPC_DOMAIN_PREFIX")]
    pub domain_prefix: Option<String>,
    /// The built user portal (npm run build in web/) [default: web/dist].
    #[arg(long, env = "CLOUDPC_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
    /// Seconds a console ticket stays valid before it is used [default: 30].
    #[arg(long, env = "CLOUDPC_CONSOLE_TICKET_SECS")]
    pub console_ticket_secs: Option<u64>,
    /// Quickstart: on an empty directory, create a demo user (password printed once), group,
    /// license and policy, so a Cloud PC is provisioned at once.
    #[arg(long)]
    pub demo: bool,
    /// Testing only: make a provisioning step fail N times, as STEP:N (repeatable).
    #[arg(long = "inject-fault", hide = true)]
    pub inject_fault: Vec<String>,
    /// Testing only: pause at a named point for MS milliseconds, as POINT:MS (repeatable); the
    /// point is `startGeneration` (after a Cloud PC has read its policy's image).
    #[arg(long = "inject-delay", hide = true)]
    pub inject_delay: Vec<String>,
    /// Testing only: how many seconds one minute of a policy's `hibernateAfterMinutes` lasts.
    #[arg(long, hide = true)]
    pub idle_minute_secs: Option<u64>,
    /// Virtual disk a host may promise per GiB of disk it has: Cloud PC disks are thin overlays
    /// that grow as they are written, so licenses' sizes are counted against the host's disk times
    /// this ratio [default: 4]; 1 reserves every license's full size.
    #[arg(long, env = "CLOUDPC_DISK_OVERCOMMIT")]
    pub disk_overcommit: Option<f64>,
    /// Run no hypervisor host in this process: a control plane only, whose hosts all join with
    /// `cloudpc host-agent` (TOML: local_host = false).
    #[arg(long)]
    pub no_local_host: bool,
    /// Refuse sign-in with cloudpc passwords: everyone signs in through the organisation's
    /// identity provider (`/cloudpc/identityProviders`) (TOML: local_sign_in = false).
    #[arg(long)]
    pub no_local_sign_in: bool,
    /// The 32-byte key file that seals secrets kept in the database (network connections'
    /// domain passwords); made on first use [default: <data dir>/secrets.key]. Replicas must share
    /// it; keep it out of database backups (TOML: secrets_key_file).
    #[arg(long, env = "CLOUDPC_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// How many Cloud PCs may be provisioned at the same time [default: 4; more with many hosts].
    #[arg(long, env = "CLOUDPC_MAX_PARALLEL_PROVISIONING")]
    pub max_parallel_provisioning: Option<usize>,
    /// vCPUs a host may promise per vCPU it reports (hosts report 4 per core) [default: 1].
    #[arg(long, env = "CLOUDPC_CPU_OVERCOMMIT")]
    pub cpu_overcommit: Option<f64>,
    /// Evacuate a host after it has been unreachable this many minutes: its Cloud PCs are
    /// recreated on other hosts and what their users saved there is lost [default: never; an
    /// admin evacuates with `cloudpc hosts evacuate`].
    #[arg(long, env = "CLOUDPC_EVACUATE_AFTER_MINS")]
    pub evacuate_after_mins: Option<u64>,
    /// Memory a host may promise per MiB it reports [default: 1].
    #[arg(long, env = "CLOUDPC_MEMORY_OVERCOMMIT")]
    pub memory_overcommit: Option<f64>,
    /// The address users reach cloudpc at, such as https://cloudpc.contoso.com (behind a TLS
    /// proxy): with https, session cookies are Secure and __Host- prefixed.
    #[arg(long, env = "CLOUDPC_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Seconds between two runs of every network connection's health checks [default: 21600,
    /// six hours].
    #[arg(long, env = "CLOUDPC_NETWORK_CHECK_INTERVAL_SECS")]
    pub network_check_interval_secs: Option<u64>,
    /// Days audit events are kept; older ones are deleted every hour [default: 365].
    #[arg(long, env = "CLOUDPC_AUDIT_RETENTION_DAYS")]
    pub audit_retention_days: Option<u32>,
    /// Testing only: panic N times at a named point, as POINT:N (repeatable): a step name,
    /// `startGeneration` or `reconcile` (the start of a reconciler pass).
    #[arg(long = "inject-panic", hide = true)]
    pub inject_panic: Vec<String>,
    /// Seconds a custom image's test boot waits for its guest agent [default: 120].
    #[arg(long, env = "CLOUDPC_IMAGE_BOOT_TIMEOUT_SECS")]
    pub image_boot_timeout_secs: Option<u64>,
    /// Seconds an image upload may send nothing before it is dropped [default: 60].
    #[arg(long, env = "CLOUDPC_UPLOAD_IDLE_TIMEOUT_SECS")]
    pub upload_idle_timeout_secs: Option<u64>,
    /// How many custom images the server keeps at most (versions do not count) [default: 20].
    #[arg(long, env = "CLOUDPC_MAX_CUSTOM_IMAGES")]
    pub max_custom_images: Option<usize>,
    /// How many image uploads may stream at once; more get 429 [default: 4].
    #[arg(long, env = "CLOUDPC_MAX_CONCURRENT_UPLOADS")]
    pub max_concurrent_uploads: Option<usize>,
    /// A directory whose qcow2 files admins may register by path (repeatable)
    /// [default: DATA_DIR/import].
    #[arg(long = "image-import-dir")]
    pub image_import_dirs: Vec<PathBuf>,
    /// Testing only: accept custom images without their test boot (tests of other features use
    /// blank qcow2 files as images).
    #[arg(long = "skip-image-test-boot", hide = true)]
    pub skip_image_test_boot: bool,
    /// Administrator token to register at start (for automation). Without it, a token is created
    /// on the first start and printed once.
    #[arg(long = "admin-token", env = "CLOUDPC_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Args)]
pub struct HostAgentArgs {
    /// Where the agent keeps its identity (key, certificates) and its Cloud PCs' disks
    /// [default: /var/lib/cloudpc-agent].
    #[arg(long, env = "CLOUDPC_AGENT_DATA_DIR", default_value = "/var/lib/cloudpc-agent")]
    pub data_dir: PathBuf,
    /// The control plane's URL, to join it (once; the agent remembers it).
    #[arg(long, requires = "token")]
    pub join: Option<String>,
    /// The join token from `cloudpc hosts join-token` (single use, short-lived).
    #[arg(long, env = "CLOUDPC_JOIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// This host's name [default: the machine's host name].
    #[arg(long)]
    pub name: Option<String>,
    /// Address and port the agent listens on (mutual TLS: only the control plane gets in)
    /// [default: 0.0.0.0:7366].
    #[arg(long, default_value = "0.0.0.0:7366")]
    pub listen: SocketAddr,
    /// Where the control plane reaches this agent, https://HOST:PORT [default: from --listen,
    /// with this machine's host name when listening on all addresses].
    #[arg(long)]
    pub advertise: Option<String>,
    /// Prefix of the libvirt domains this agent makes, so several agents can share a libvirt
    /// [default: cloudpc-]. Set at the join and kept: the agent finds its VMs by it.
    #[arg(long)]
    pub domain_prefix: Option<String>,
    /// libvirt URI of this host [default: qemu:///system].
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Seconds without hearing from a control plane after which the agent stops its VMs, so a
    /// Cloud PC recreated on another host never runs twice [default: 60].
    #[arg(long, default_value_t = 60)]
    pub fence_after_secs: u64,
    /// Gallery directory, for the kernel of the KVM probe [default: /var/lib/cloudpc/gallery].
    #[arg(long, default_value = "/var/lib/cloudpc/gallery")]
    pub gallery_dir: PathBuf,
    /// vCPUs to offer [default: 4 per core].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory to offer in MiB [default: the machine's, less 2 GiB].
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Disk to offer in GiB [default: free space of the data directory].
    #[arg(long)]
    pub disk_gib: Option<u64>,
    /// A simulated host, for scale tests: no VM is made; every operation answers at once (after
    /// --simulate-latency-ms) as a healthy host would.
    #[arg(long)]
    pub simulate: bool,
    /// Latency of each simulated operation, in milliseconds [default: 0].
    #[arg(long, default_value_t = 0, requires = "simulate")]
    pub simulate_latency_ms: u64,
    /// Log filter [default: info].
    #[arg(long, env = "CLOUDPC_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Subcommand)]
pub enum HostsCmd {
    /// List hosts with state, capacity and use.
    List(ListArgs),
    /// Show one host (by id or name).
    Get { host: String },
    /// Print a join token for a new host of REGION (shown once).
    JoinToken {
        #[arg(long)]
        region: String,
        /// Minutes the token can be used [default: 30].
        #[arg(long)]
        valid_minutes: Option<u32>,
    },
    /// Stop placing new Cloud PCs on the host; its Cloud PCs stay.
    Maintenance { host: String },
    /// Place new Cloud PCs on the host again.
    Ready { host: String },
    /// Stop placing on the host and move its Cloud PCs to other hosts of the region.
    Drain { host: String },
    /// Remove a host that has no Cloud PCs left.
    Delete { host: String },
    /// Recreate the Cloud PCs of a lost (unreachable) host on other hosts. What their users
    /// saved on it is lost: without --yes, only says how many Cloud PCs that is.
    Evacuate {
        host: String,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
pub enum IdpCmd {
    /// List the connected identity providers.
    List(ListArgs),
    /// Show one provider (by id or name).
    Get { provider: String },
    /// Connect a provider: its OpenID Connect issuer and client, and the groups that grant roles.
    Add {
        /// The name shown on the sign-in pages ("Sign in with NAME").
        #[arg(long)]
        name: String,
        /// The issuer URL (its discovery document is ISSUER/.well-known/openid-configuration).
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        client_id: String,
        /// The client secret, read from this environment variable (so it stays out of the
        /// shell's history and the process list).
        #[arg(long)]
        client_secret_env: Option<String>,
        /// A value of the groups claim that grants Cloud PC Administrator (repeatable).
        #[arg(long = "admin-group")]
        admin_groups: Vec<String>,
        /// A value of the groups claim that grants Cloud PC Reader (repeatable).
        #[arg(long = "reader-group")]
        reader_groups: Vec<String>,
        /// The claim matched to userPrincipalName [default: preferred_username].
        #[arg(long)]
        username_claim: Option<String>,
        /// The claim that carries groups [default: groups].
        #[arg(long)]
        groups_claim: Option<String>,
        /// Scopes to ask for besides openid [default: profile email] (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    /// Issue the provider's SCIM token (shown once; an earlier one stops working).
    ScimToken { provider: String },
    /// Disconnect a provider that manages no users or groups any more.
    Delete { provider: String },
}

#[derive(Subcommand)]
pub enum NetCmd {
    /// List the network connections.
    List(ListArgs),
    /// Show one connection (by id or name).
    Get { connection: String },
    /// Add a connection: the host bridge that leads to the organisation's network, and (to join
    /// an Active Directory domain) the domain, OU and joining account.
    Add {
        #[arg(long)]
        name: String,
        /// The host bridge on the organisation's network (each host of the region has it).
        #[arg(long)]
        bridge: String,
        /// The VLAN tag on that bridge.
        #[arg(long)]
        vlan: Option<u16>,
        /// The region whose hosts serve the connection [default: local].
        #[arg(long)]
        region: Option<String>,
        /// The Active Directory domain to join (leave out for a connection without domain join).
        #[arg(long)]
        domain: Option<String>,
        /// The account that joins computers to the domain.
        #[arg(long)]
        username: Option<String>,
        /// The account's password, read from this environment variable (so it stays out of the
        /// shell's history and the process list).
        #[arg(long)]
        password_env: Option<String>,
        /// The organisational unit for the Cloud PCs' computer objects (a distinguished name).
        #[arg(long)]
        ou: Option<String>,
    },
    /// Run the connection's health checks now and wait for the results (exit status 1 when a
    /// check failed).
    Check { connection: String },
    /// Remove a connection no provisioning policy uses.
    Delete { connection: String },
}

#[derive(Subcommand)]
pub enum UsersCmd {
    /// List users.
    List(ListArgs),
    /// Show one user (by id or userPrincipalName).
    Get { user: String },
    /// Create a user.
    Create {
        #[arg(long)]
        upn: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        mail: Option<String>,
        /// Create the account disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Change a user.
    Update {
        user: String,
        #[arg(long)]
        upn: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        mail: Option<String>,
        #[arg(long)]
        enabled: Option<bool>,
    },
    /// Delete a user.
    Delete { user: String },
    /// Add or remove a user's direct licenses (SKU by id or part number).
    AssignLicense {
        user: String,
        #[arg(long = "add")]
        add: Vec<String>,
        #[arg(long = "remove")]
        remove: Vec<String>,
    },
    /// The licenses a user holds, directly or through groups.
    Licenses { user: String },
    /// The groups a user is in.
    Groups { user: String },
}

#[derive(Subcommand)]
pub enum GroupsCmd {
    List(ListArgs),
    /// Show one group (by id or display name).
    Get {
        group: String,
    },
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    Update {
        group: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    Delete {
        group: String,
    },
    /// List a group's members.
    Members {
        group: String,
    },
    /// Add a user (id or userPrincipalName) to a group.
    AddMember {
        group: String,
        user: String,
    },
    /// Remove a user from a group.
    RemoveMember {
        group: String,
        user: String,
    },
    /// Add or remove group-based licenses.
    AssignLicense {
        group: String,
        #[arg(long = "add")]
        add: Vec<String>,
        #[arg(long = "remove")]
        remove: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum SkusCmd {
    List(ListArgs),
    /// Show one SKU (by id or part number).
    Get {
        sku: String,
    },
    Create {
        /// Short name, like CPC_E_2C_8GB_128GB.
        #[arg(long)]
        part_number: String,
        #[arg(long)]
        name: Option<String>,
        /// Number of seats (prepaidUnits.enabled).
        #[arg(long)]
        seats: u32,
        #[arg(long)]
        vcpu: u32,
        #[arg(long)]
        ram_gb: u32,
        #[arg(long)]
        storage_gb: u32,
    },
    Update {
        sku: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        seats: Option<u32>,
        #[arg(long)]
        vcpu: Option<u32>,
        #[arg(long)]
        ram_gb: Option<u32>,
        #[arg(long)]
        storage_gb: Option<u32>,
    },
    Delete {
        sku: String,
    },
}

#[derive(Subcommand)]
pub enum ImagesCmd {
    /// List the built-in gallery images.
    Gallery(ListArgs),
    /// Delete a gallery image build that no policy or Cloud PC uses, with its files.
    GalleryDelete {
        image: String,
    },
    /// List custom images.
    List(ListArgs),
    Get {
        image: String,
    },
    /// Register a qcow2 file on the server's host as a custom image.
    Create {
        #[arg(long)]
        name: String,
        /// Major.Minor.Patch
        #[arg(long)]
        version: String,
        /// Absolute path of the image file on the server's host.
        #[arg(long)]
        file: String,
        #[arg(long, value_enum, default_value_t = ImageFormat::Qcow2)]
        format: ImageFormat,
        /// Wait until the image is checked, showing progress; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
    },
    /// Upload a local disk image (qcow2, or raw with --format raw) as a new custom image
    /// (streamed, with progress).
    Upload {
        /// The local image file.
        file: std::path::PathBuf,
        #[arg(long, value_enum, default_value_t = ImageFormat::Qcow2)]
        format: ImageFormat,
        #[arg(long)]
        name: String,
        /// Major.Minor.Patch
        #[arg(long)]
        version: String,
        #[arg(long)]
        os: Option<String>,
        /// Wait until the image is checked and test-booted; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
    },
    /// Add a new version to a custom image; existing Cloud PCs keep theirs until reprovisioned.
    AddVersion {
        image: String,
        /// Major.Minor.Patch, higher than every version the image has.
        #[arg(long)]
        version: String,
        /// Absolute path of the image file on the server's host.
        #[arg(long, conflicts_with = "upload", required_unless_present = "upload")]
        file: Option<String>,
        /// A local image file to upload.
        #[arg(long)]
        upload: Option<std::path::PathBuf>,
        #[arg(long, value_enum, default_value_t = ImageFormat::Qcow2)]
        format: ImageFormat,
        #[arg(long)]
        wait: bool,
    },
    Delete {
        image: String,
    },
    /// Delete one version of a custom image and its files (not one a Cloud PC is built from).
    DeleteVersion {
        image: String,
        #[arg(long)]
        version: String,
    },
}

#[derive(Subcommand)]
pub enum PoliciesCmd {
    List(ListArgs),
    /// Show one policy (by id or display name), with its assignments.
    Get {
        policy: String,
    },
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Image id (custom image id, or gallery id).
        #[arg(long)]
        image: String,
        #[arg(long, value_enum, default_value_t = ImageKind::Custom)]
        image_type: ImageKind,
        /// Naming template, for example CPC-%USERNAME:4%-%RAND:5%.
        #[arg(long)]
        naming_template: Option<String>,
        /// Make the user a local administrator.
        #[arg(long)]
        local_admin: bool,
        /// Hosted-network region ("automatic" lets cloudpc choose).
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        locale: Option<String>,
        /// Hibernate a Cloud PC whose console has been closed this many minutes (off if absent).
        #[arg(long)]
        hibernate_after_minutes: Option<u32>,
        /// Booted, unassigned Cloud PCs to keep ready per license with free seats [default: 0].
        #[arg(long)]
        warm_pool_size: Option<u32>,
    },
    Update {
        policy: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        image: Option<String>,
        #[arg(long, value_enum)]
        image_type: Option<ImageKind>,
        #[arg(long)]
        naming_template: Option<String>,
        #[arg(long)]
        local_admin: Option<bool>,
        #[arg(long)]
        locale: Option<String>,
        /// Minutes with the console closed before a Cloud PC is hibernated; 0 turns it off.
        #[arg(long)]
        hibernate_after_minutes: Option<u32>,
        /// Booted, unassigned Cloud PCs to keep ready per license with free seats; 0 for none.
        #[arg(long)]
        warm_pool_size: Option<u32>,
    },
    Delete {
        policy: String,
    },
    /// Set the policy's target groups, in order (replaces the previous list; none clears it).
    Assign {
        policy: String,
        /// A group (id or display name); repeat in priority order.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ImageKind {
    Gallery,
    Custom,
}

#[derive(Subcommand)]
pub enum CloudPcsCmd {
    List(ListArgs),
    Get {
        cloud_pc: String,
    },
    /// Each provisioning step with its start, duration, status and error.
    Steps {
        cloud_pc: String,
    },
    /// Wait until provisioning ends, showing the step it is on; non-zero exit if it failed.
    Wait {
        cloud_pc: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// Delete and recreate from the user's current policy (provisioned or failed Cloud PCs).
    Reprovision {
        cloud_pc: String,
    },
    /// Provision a failed Cloud PC again.
    Retry {
        cloud_pc: String,
    },
    /// Restart the VM.
    Reboot {
        cloud_pc: String,
    },
    PowerOff {
        cloud_pc: String,
    },
    /// Start the VM; a hibernated one resumes where it was.
    PowerOn {
        cloud_pc: String,
    },
    /// Save the running VM's memory to disk and stop it, freeing its RAM.
    Hibernate {
        cloud_pc: String,
    },
    /// Start a hibernated VM from its saved memory.
    Resume {
        cloud_pc: String,
    },
    /// Change the display name (the device name stays).
    Rename {
        cloud_pc: String,
        #[arg(long)]
        name: String,
    },
    /// Deprovision a Cloud PC in its grace period now.
    EndGracePeriod {
        cloud_pc: String,
    },
    /// Show the user's one-time password (once; cloudpc forgets it afterwards).
    InitialPassword {
        cloud_pc: String,
    },
}

#[derive(Subcommand)]
pub enum AuditCmd {
    List(ListArgs),
}

#[derive(Subcommand)]
pub enum TokensCmd {
    List,
    /// Create a token; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The token stops working after this many days (without it, it lasts until revoked).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        expires_in_days: Option<u32>,
    },
    /// Revoke a token: it is refused from the next request on.
    Revoke {
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Administrator,
    Reader,
}

#[derive(Args)]
pub struct ListArgs {
    /// OData filter, for example "displayName eq 'Finance'".
    #[arg(long)]
    pub filter: Option<String>,
    /// Return at most this many (otherwise every page is fetched).
    #[arg(long)]
    pub top: Option<usize>,
}

/// The format of an image file: qcow2, or raw (a plain disk image as `dd` makes). The server
/// keeps a qcow2 copy either way.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}
