// Builds the portal (index.html) and the admin console (admin.html) into dist/, which the cloudpc
// server serves. noVNC comes from npm.
export default {
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    rollupOptions: { input: { portal: "index.html", admin: "admin.html" } },
  },
};
