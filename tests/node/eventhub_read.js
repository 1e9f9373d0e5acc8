// A hub's built-in Event Hub-compatible endpoint read with Microsoft's Node.js Event Hubs SDK
// (@azure/event-hubs), from the connection string in EVENTHUB_CONNECTION_STRING:
//
//   node eventhub_read.js properties '{}'  -> {"name", "partitionIds", "partitions": {id: {...}}}
//   node eventhub_read.js read '{"consumerGroup", "partitionId", "from", "count", "deviceId"}'
//        (no partitionId: every partition)
//        from: {"earliest": true} | {"offset": "..."} | {"sequenceNumber": n, "isInclusive": bool}
//              | {"enqueuedOn": "<ISO time>"}
//        -> the first `count` events of `deviceId` from there: [{body, messageId, contentType, deviceId,
//           messageSource, sequenceNumber, offset, enqueuedTimeUtc, properties}]
'use strict';

const { EventHubConsumerClient, earliestEventPosition } = require('@azure/event-hubs');
const { run, secret } = require('./common');

const TIMEOUT_MS = 60000;

function client(group) {
  return new EventHubConsumerClient(group || '$Default', secret('EVENTHUB_CONNECTION_STRING'));
}

function position(from) {
  if (!from || from.earliest) {
    return earliestEventPosition;
  }
  if (from.enqueuedOn) {
    return { enqueuedOn: new Date(from.enqueuedOn) };
  }
  return from;
}

function summary(event) {
  const system = event.systemProperties || {};
  return {
    body: event.body,
    messageId: event.messageId,
    contentType: event.contentType,
    deviceId: system['iothub-connection-device-id'],
    messageSource: system['iothub-message-source'],
    sequenceNumber: event.sequenceNumber,
    offset: String(event.offset),
    enqueuedTimeUtc: event.enqueuedTimeUtc.toISOString(),
    properties: event.properties,
  };
}

run({
  async properties() {
    const consumer = client();
    try {
      const hub = await consumer.getEventHubProperties();
      const partitions = {};
      for (const id of hub.partitionIds) {
        const p = await consumer.getPartitionProperties(id);
        partitions[id] = {
          beginningSequenceNumber: p.beginningSequenceNumber,
          lastEnqueuedSequenceNumber: p.lastEnqueuedSequenceNumber,
          isEmpty: p.isEmpty,
        };
      }
      return { name: hub.name, partitionIds: hub.partitionIds, partitions };
    } finally {
      await consumer.close();
    }
  },
  async read({ consumerGroup, partitionId, from, count, deviceId }) {
    const consumer = client(consumerGroup);
    const found = [];
    try {
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`only ${found.length} of ${count} events`)), TIMEOUT_MS);
        const handlers = {
          async processEvents(events) {
            for (const event of events) {
              const item = summary(event);
              if (!deviceId || item.deviceId === deviceId) {
                found.push(item);
              }
            }
            if (found.length >= count) {
              clearTimeout(timer);
              resolve();
            }
          },
          async processError(err) {
            clearTimeout(timer);
            reject(err);
          },
        };
        const options = { startPosition: position(from), maxWaitTimeInSeconds: 1 };
        if (partitionId === undefined) {
          consumer.subscribe(handlers, options);  // every partition
        } else {
          consumer.subscribe(partitionId, handlers, options);
        }
      });
    } finally {
      await consumer.close();
    }
    return found.slice(0, count);
  },
});
