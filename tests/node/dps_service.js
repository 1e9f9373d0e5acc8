// DPS individual enrollments and enrollment groups with Microsoft's Node.js service SDK
// (azure-iot-provisioning-service), from the connection string in DPS_CONNECTION_STRING (HostName=<host>:
// the SDK adds no port):
//
//   node dps_service.js create '{"enrollment": {...}}'      -> the stored enrollment
//   node dps_service.js get '{"id"}'                        -> the enrollment
//   node dps_service.js query '{"query", "pageSize"}'       -> {"pages": [[registrationId...]...]}
//   node dps_service.js delete '{"id", "etag"}'             -> {"deleted": id}
//   node dps_service.js get-group '{"id"}'                  -> the enrollment group
//   node dps_service.js put-group '{"group": {...}}'        -> the stored group (If-Match: group.etag, if any)
//   node dps_service.js group-registrations '{"id"}'        -> the registration states of the group's devices
'use strict';

const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { run, secret } = require('./common');

function client() {
  return ProvisioningServiceClient.fromConnectionString(secret('DPS_CONNECTION_STRING'));
}

run({
  async create({ enrollment }) {
    return (await client().createOrUpdateIndividualEnrollment(enrollment)).responseBody;
  },
  async get({ id }) {
    return (await client().getIndividualEnrollment(id)).responseBody;
  },
  async query({ query, pageSize }) {
    const pages = [];
    const cursor = client().createIndividualEnrollmentQuery({ query }, pageSize);
    while (cursor.hasMoreResults) {
      // next() without arguments would start over: the token has to be passed back explicitly
      const page = (await cursor.next(cursor.continuationToken)).responseBody;
      pages.push(page.map((enrollment) => enrollment.registrationId));
    }
    return { pages };
  },
  async delete({ id, etag }) {
    await client().deleteIndividualEnrollment(id, etag);
    return { deleted: id };
  },
  async 'get-group'({ id }) {
    return (await client().getEnrollmentGroup(id)).responseBody;
  },
  async 'put-group'({ group }) {
    return (await client().createOrUpdateEnrollmentGroup(group)).responseBody;
  },
  async 'group-registrations'({ id }) {
    const states = [];
    const cursor = client().createEnrollmentGroupDeviceRegistrationStateQuery({ query: '*' }, id);
    while (cursor.hasMoreResults) {
      states.push(...(await cursor.next(cursor.continuationToken)).responseBody);
    }
    return states;
  },
});
