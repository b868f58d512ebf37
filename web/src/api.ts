// Talks to the cloudpc portal API. Every write carries X-CloudPC-Portal (the server's CSRF guard);
// the session itself is an HttpOnly cookie the script never sees.

export class ApiError extends Error {
  constructor(public status: number, message: string) {
    super(message);
  }
}

async function call(method: string, path: string, body?: unknown): Promise<any> {
  const headers: Record<string, string> = { "X-CloudPC-Portal": "1" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(`/portal/api${path}`, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, data?.error?.message ?? `HTTP ${resp.status}`);
  return data;
}

export interface CloudPc {
  id: string;
  displayName: string;
  managedDeviceName: string | null;
  status: string;
  statusDetail: string | null;
  powerState: string;
  /** "saved" when hibernated: opening it resumes it where its user left it. */
  powerStateDetail: string | null;
  currentStep: string | null;
  currentStepStatus: string | null;
}

export const api = {
  signIn: (userPrincipalName: string, password: string) => call("POST", "/signIn", { userPrincipalName, password }),
  signOut: () => call("POST", "/signOut"),
  me: () => call("GET", "/me"),
  cloudPcs: async (): Promise<CloudPc[]> => (await call("GET", "/cloudPCs")).value,
  reboot: (id: string) => call("POST", `/cloudPCs/${id}/reboot`),
  rename: (id: string, displayName: string) => call("POST", `/cloudPCs/${id}/rename`, { displayName }),
  ticket: async (id: string): Promise<{ url: string }> => call("POST", `/cloudPCs/${id}/getConsoleTicket`),
};
