// client.mjs BASE_URL [TOKEN] — drive the gateway's FHIR API with the outside Node.js client fhir-kit-client
// (pinned in package.json) and print ONE JSON summary line on stdout. BASE_URL and TOKEN may instead come from
// FHIR_BASE_URL and FHIR_BEARER_TOKEN. Exit 1 (with the error on stderr) when any call fails unexpectedly.
// Run by tests/test_fhir_kit_client.py; not part of the gateway.
import { Client } from 'fhir-kit-client';

const baseUrl = process.argv[2] || process.env.FHIR_BASE_URL;
const token = process.argv[3] || process.env.FHIR_BEARER_TOKEN;
if (!baseUrl) {
  console.error('usage: node client.mjs BASE_URL [TOKEN]  (or FHIR_BASE_URL / FHIR_BEARER_TOKEN)');
  process.exit(2);
}
const client = new Client({ baseUrl, bearerToken: token });
const status = (resource) => Client.httpFor(resource).response?.status ?? null;

async function main() {
  const summary = {};

  const capability = await client.capabilityStatement();
  summary.capability = { status: status(capability), resourceType: capability.resourceType,
    fhirVersion: capability.fhirVersion };

  // the first page: one report plus the Observations it points at
  const first = await client.search({ resourceType: 'DiagnosticReport',
    searchParams: { _include: 'DiagnosticReport:result', _count: 1 } });
  const modes = (bundle) => (bundle.entry || []).map((e) => [e.search?.mode, e.resource?.resourceType]);
  const pages = [{ status: status(first), total: first.total ?? null, entries: modes(first) }];
  const reportIds = [];
  const observationIds = new Set();
  const collect = (bundle) => {
    for (const e of bundle.entry || []) {
      if (e.search?.mode === 'match' && e.resource?.resourceType === 'DiagnosticReport') reportIds.push(e.resource.id);
      if (e.search?.mode === 'include' && e.resource?.resourceType === 'Observation') observationIds.add(e.resource.id);
    }
  };
  collect(first);
  let page = first;
  for (let guard = 0; guard < 1000; guard += 1) {
    const next = await client.nextPage({ bundle: page });
    if (!next) break;
    pages.push({ status: status(next), total: next.total ?? null, entries: modes(next) });
    collect(next);
    page = next;
  }
  summary.search = { total: first.total ?? null, pages, reportIds, includedObservations: [...observationIds] };

  const id = reportIds[0];
  const report = await client.read({ resourceType: 'DiagnosticReport', id });
  summary.read = { status: status(report), resourceType: report.resourceType, id: report.id,
    versionId: report.meta?.versionId ?? null };
  const version = await client.vread({ resourceType: 'DiagnosticReport', id, version: '1' });
  summary.vread = { status: status(version), resourceType: version.resourceType, id: version.id,
    versionId: version.meta?.versionId ?? null };

  const count = await client.search({ resourceType: 'DiagnosticReport', searchParams: { _summary: 'count' } });
  summary.count = { status: status(count), resourceType: count.resourceType, type: count.type,
    total: count.total ?? null, entries: (count.entry || []).length };

  // an "Observation" that is really a Patient: no status, no code, and Patient's elements
  const bad = { resourceType: 'Observation', name: [{ family: '王', given: ['小明'] }], gender: 'male',
    birthDate: '1980-01-01' };
  let outcome;
  let validateStatus;
  try {
    outcome = await client.operation({ name: '$validate', resourceType: 'Observation', input: bad });
    validateStatus = status(outcome);
  } catch (error) {
    if (!error.response) throw error;
    validateStatus = error.response.status;
    outcome = typeof error.response.data === 'string' ? JSON.parse(error.response.data) : error.response.data;
  }
  const issues = outcome?.issue || [];
  summary.validate = { status: validateStatus, resourceType: outcome?.resourceType,
    severities: issues.map((i) => i.severity),
    errors: issues.filter((i) => i.severity === 'error' || i.severity === 'fatal').length };

  process.stdout.write(`${JSON.stringify(summary)}\n`);
}

main().catch((error) => {
  const detail = error.response ? ` ${JSON.stringify(error.response.data).slice(0, 500)}` : '';
  console.error(`fhir-kit-client: ${error.stack || error}${detail}`);
  process.exit(1);
});
