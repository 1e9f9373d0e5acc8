// An IoT hub's registry and twins with Microsoft's Node.js service SDK (azure-iothub), from the connection
// string in HUB_CONNECTION_STRING (HostName=<host>: the SDK adds no port):
//
//   node hub_service.js list '{}'                                 -> [deviceId...]
//   node hub_service.js get-twin '{"deviceId"}'                   -> {"etag", "tags", "desired", "reported"}
//   node hub_service.js update-twin '{"deviceId", "patch", "etag"}' -> the same, after the patch
'use strict';

const { Registry } = require('azure-iothub');
const { run, secret } = require('./common');

function registry() {
  return Registry.fromConnectionString(secret('HUB_CONNECTION_STRING'));
}

function twinAnswer(twin) {
  return {
    deviceId: twin.deviceId,
    etag: twin.etag,
    tags: twin.tags,
    desired: twin.properties.desired,
    reported: twin.properties.reported,
  };
}

run({
  async list() {
    return (await registry().list()).responseBody.map((device) => device.deviceId);
  },
  async 'get-twin'({ deviceId }) {
    return twinAnswer((await registry().getTwin(deviceId)).responseBody);
  },
  async 'update-twin'({ deviceId, patch, etag }) {
    return twinAnswer((await registry().updateTwin(deviceId, patch, etag)).responseBody);
  },
});
