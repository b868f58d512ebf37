// Builds the portal into dist/, which the cloudpc server serves. noVNC comes from npm.
export default {
  build: { outDir: "dist", emptyOutDir: true, target: "es2022" },
};
