// The seed's first run with Microsoft's Node.js device SDKs: register with DPS by X.509 over MQTT
// (azure-iot-provisioning-device-mqtt + azure-iot-security-x509), connect to the assigned hub
// (azure-iot-device-mqtt), read the twin, report properties, and send telemetry every interval.
//
//   node device_flow.js '{"provisioningHost", "idScope", "registrationId", "certFile", "keyFile",
//                         "reported": {...}, "messages": N, "intervalMs": ms}'
//
// Answers {"registration", "registrationState" (all of it, as DPS sent it), "desired", "sent": [{"seq",
// "messageId"}...]}, or DPS's refusal of the registration as {"error": {"name", "status", "result"}}
// (common.js).  The emulator's CA comes from NODE_EXTRA_CA_CERTS, as for any Node.js program.
'use strict';

const fs = require('fs');
const { Client, Message } = require('azure-iot-device');
const { Mqtt: HubMqtt } = require('azure-iot-device-mqtt');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt: ProvisioningMqtt } = require('azure-iot-provisioning-device-mqtt');
const { X509Security } = require('azure-iot-security-x509');
const { run } = require('./common');

function reportProperties(twin, patch) {
  return new Promise((resolve, reject) => {
    twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()));
  });
}

function sendEvery(client, deviceId, count, intervalMs) {
  const sent = [];
  return new Promise((resolve, reject) => {
    const timer = setInterval(() => {
      const seq = sent.length + 1;
      if (seq > count) {
        return;
      }
      const message = new Message(JSON.stringify({ deviceId, seq, at: new Date().toISOString() }));
      message.messageId = `${deviceId}-${seq}`;
      message.contentType = 'application/json';
      message.contentEncoding = 'utf-8';
      sent.push({ seq, messageId: message.messageId });
      client.sendEvent(message).then(() => {
        if (seq === count) {
          clearInterval(timer);
          resolve(sent);
        }
      }, (err) => {
        clearInterval(timer);
        reject(err);
      });
    }, intervalMs);
  });
}

async function main(options) {
  const identity = {
    cert: fs.readFileSync(options.certFile, 'utf8'),
    key: fs.readFileSync(options.keyFile, 'utf8'),
  };
  const provisioning = ProvisioningDeviceClient.create(
    options.provisioningHost,
    options.idScope,
    new ProvisioningMqtt(),
    new X509Security(options.registrationId, identity),
  );
  const registration = await provisioning.register();
  const client = Client.fromConnectionString(
    `HostName=${registration.assignedHub};DeviceId=${registration.deviceId};x509=true`,
    HubMqtt,
  );
  await client.setOptions(identity);
  await client.open();
  try {
    const twin = await client.getTwin();
    await reportProperties(twin, options.reported);
    const sent = await sendEvery(client, registration.deviceId, options.messages, options.intervalMs);
    return {
      registration: { assignedHub: registration.assignedHub, deviceId: registration.deviceId },
      registrationState: registration,
      desired: twin.properties.desired,
      sent,
    };
  } finally {
    await client.close();
  }
}

run({ main });
