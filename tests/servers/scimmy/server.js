// A minimal in-memory SCIM 2.0 server on SCIMMY + scimmy-routers, for the provisioner's tests.
//
//   node server.js --port 8123 --token SECRET      (or PORT / SCIM_TOKEN in the environment)
//
// Serves /scim/v2 (Users with the enterprise extension, Groups, discovery) behind a static
// bearer token, on 127.0.0.1. SCIMMY parses, validates, patches, filters and pages; this file
// only stores. Two routes outside SCIM, with the same token, serve the tests:
//   GET  /_test/dump      {"Users": [...], "Groups": [...], "requests": N}  the stored truth
//   POST /_test/clear     empty the store and the request counter
// Prints "listening PORT" on stdout once it accepts connections.

import {randomUUID} from "node:crypto";
import express from "express";
import SCIMMY from "scimmy";
import SCIMMYRouters from "scimmy-routers";

function option(name, variable, fallback) {
    const index = process.argv.indexOf(`--${name}`);
    if (index > 0 && process.argv[index + 1]) return process.argv[index + 1];
    return process.env[variable] ?? fallback;
}

const port = Number(option("port", "PORT", "0"));
const token = option("token", "SCIM_TOKEN", "");
if (!token) {
    console.error("a bearer token is required: --token T or SCIM_TOKEN");
    process.exit(2);
}

const store = {Users: new Map(), Groups: new Map()};
let requests = 0;

function authorized(request) {
    return request.header("Authorization") === `Bearer ${token}`;
}

function meta(previous, resourceType) {
    const now = new Date().toISOString();
    return {resourceType, created: previous?.meta?.created ?? now, lastModified: now};
}

// What SCIMMY hands to ingress is a schema instance; store it as plain JSON.
function plain(instance) {
    return JSON.parse(JSON.stringify(instance));
}

function list(kind, resource) {
    const all = [...store[kind].values()];
    if (resource.id) {
        const found = store[kind].get(resource.id);
        if (!found) throw new SCIMMY.Types.Error(404, null, `Resource ${resource.id} not found`);
        return found;
    }
    return resource.filter ? resource.filter.match(all) : all;
}

function write(kind, resourceType, resource, instance, unique) {
    const data = plain(instance);
    const previous = resource.id ? store[kind].get(resource.id) : undefined;
    if (resource.id && !previous) throw new SCIMMY.Types.Error(404, null, `Resource ${resource.id} not found`);
    if (unique) {
        const wanted = String(data[unique] ?? "").toLowerCase();
        for (const other of store[kind].values()) {
            if (other.id !== resource.id && String(other[unique] ?? "").toLowerCase() === wanted) {
                throw new SCIMMY.Types.Error(409, "uniqueness", `${unique} ${data[unique]} is already taken`);
            }
        }
    }
    delete data.schemas;
    const id = resource.id ?? randomUUID();
    const stored = {...data, id, meta: meta(previous, resourceType)};
    store[kind].set(id, stored);
    return stored;
}

function remove(kind, resource) {
    if (!store[kind].delete(resource.id)) throw new SCIMMY.Types.Error(404, null, `Resource ${resource.id} not found`);
}

SCIMMY.Config.set({
    patch: {supported: true},
    filter: {supported: true, maxResults: 1000},
    sort: {supported: true},
    bulk: {supported: false},
    changePassword: {supported: false},
    etag: {supported: false},
});

SCIMMY.Resources.declare(SCIMMY.Resources.User.extend(SCIMMY.Schemas.EnterpriseUser, false))
    .ingress((resource, instance) => write("Users", "User", resource, instance, "userName"))
    .egress((resource) => list("Users", resource))
    .degress((resource) => remove("Users", resource));

SCIMMY.Resources.declare(SCIMMY.Resources.Group)
    .ingress((resource, instance) => write("Groups", "Group", resource, instance, null))
    .egress((resource) => list("Groups", resource))
    .degress((resource) => remove("Groups", resource));

const app = express();
app.disable("x-powered-by");

app.use((request, response, next) => {
    if (request.path.startsWith("/scim/")) requests += 1;
    next();
});

app.get("/_test/dump", (request, response) => {
    if (!authorized(request)) return response.status(401).end();
    response.json({Users: [...store.Users.values()], Groups: [...store.Groups.values()], requests});
});

app.post("/_test/clear", (request, response) => {
    if (!authorized(request)) return response.status(401).end();
    store.Users.clear();
    store.Groups.clear();
    requests = 0;
    response.status(204).end();
});

app.use("/scim/v2", new SCIMMYRouters({
    type: "bearer",
    docUri: "https://datatracker.ietf.org/doc/html/rfc6750",
    handler: (request) => {
        if (!authorized(request)) throw new Error("Authorization failed");
        return "provisioner-tests";
    },
}));

const server = app.listen(port, "127.0.0.1", () => {
    console.log(`listening ${server.address().port}`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
    process.on(signal, () => server.close(() => process.exit(0)));
}
